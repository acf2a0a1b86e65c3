//! Open-set identification through the public API: hand-computed cases and
//! properties over random galleries.

use mfn_eval::open_set::{evaluate, MAX_RANK};
use mfn_eval::{Error, OpenSetReport, Probe};

/// Marsaglia's xorshift64: deterministic test data without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (modulo bias is irrelevant at these sizes).
    fn below(&mut self, n: u32) -> u32 {
        ((self.next_u64() >> 32) % u64::from(n)) as u32
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A search of every probe against a gallery of `gallery` identities, keeping
/// the best `keep` candidates; genuine scores run higher than impostor ones.
/// With `levels > 0`, scores are rounded to that many steps to force ties.
fn search(rng: &mut XorShift, probes: usize, gallery: u32, keep: usize, levels: u32) -> Vec<Probe> {
    (0..probes)
        .map(|_| {
            let truth = (rng.below(3) != 0).then(|| rng.below(gallery));
            let mut candidates: Vec<(u32, f32)> = (0..gallery)
                .map(|id| {
                    let mut s = rng.unit() * 0.6;
                    if Some(id) == truth {
                        s += 0.35;
                    }
                    if levels > 0 {
                        s = (s * f64::from(levels)).round() / f64::from(levels);
                    }
                    (id, s as f32)
                })
                .collect();
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
            candidates.truncate(keep);
            Probe { truth, candidates }
        })
        .collect()
}

#[cfg(feature = "plot")]
fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mfn-eval-open-set-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn hand_computed_identification() {
    // Gallery {10, 20, 30}; complete lists, so every known probe is found by rank 3.
    let probes = vec![
        Probe::known(10, vec![(10, 0.9), (20, 0.4), (30, 0.1)]),
        Probe::known(20, vec![(20, 0.8), (10, 0.5), (30, 0.2)]),
        Probe::known(30, vec![(10, 0.7), (30, 0.6), (20, 0.3)]),
        Probe::known(20, vec![(30, 0.75), (10, 0.7), (20, 0.7)]),
        Probe::known(30, vec![(30, 0.6), (10, 0.3), (20, 0.2)]),
        Probe::unknown(vec![(20, 0.85), (10, 0.2), (30, 0.1)]),
        Probe::unknown(vec![(10, 0.6), (20, 0.5), (30, 0.4)]),
        Probe::unknown(vec![(30, 0.6), (20, 0.5), (10, 0.4)]),
        Probe::unknown(vec![(10, 0.5), (20, 0.45), (30, 0.3)]),
    ];
    // Unknown top-1 scores: 0.85, 0.6, 0.6, 0.5 (U = 4).
    // Correct top-1 scores: 0.9, 0.8, 0.6 (probes 0, 1, 4) out of 5 known.
    let r = evaluate(&probes, &[0.0, 0.25, 0.5, 0.75, 1.0], 3).unwrap();
    assert_eq!((r.known_probes, r.unknown_probes), (5, 4));
    assert_eq!(r.rank1, 0.6);
    assert_eq!(r.cmc, [0.6, 0.8, 1.0]);
    assert_eq!(r.cmc[0], r.rank1);

    let rows: Vec<(usize, f64)> = r
        .dir_at_far
        .iter()
        .map(|d| (d.false_alarms, d.dir))
        .collect();
    assert_eq!(
        rows,
        [
            // FAR 0: above 0.85, only 0.9 is detected.
            (0, 0.2),
            // FAR 0.25 allows one alarm: above the tied 0.6 pair, so 0.9 and 0.8.
            (1, 0.4),
            // FAR 0.5 allows two, but the 2nd and 3rd tie at 0.6: both stay out,
            // and so does the known probe at 0.6.
            (1, 0.4),
            // FAR 0.75 allows three: just above 0.5, so the 0.6 ties all count.
            (3, 0.6),
            (4, 0.6),
        ]
    );
    assert_eq!(r.dir_at_far[0].threshold, next_up(0.85f32));
    assert_eq!(r.dir_at_far[1].threshold, next_up(0.6f32));
    assert_eq!(r.dir_at_far[2].threshold, next_up(0.6f32));
    assert_eq!(r.dir_at_far[3].threshold, next_up(0.5f32));
    // Every alarm allowed: the lowest top-1 score of any probe.
    assert_eq!(r.dir_at_far[4].threshold, f64::from(0.5f32));
    for d in &r.dir_at_far {
        assert_eq!(d.unknown_probes, 4);
        assert!(d.false_alarms as f64 <= (d.far * 4.0).floor());
    }
}

/// The next `f32` above a positive score, widened: where a threshold excluding it sits.
fn next_up(score: f32) -> f64 {
    assert!(score > 0.0);
    f64::from(f32::from_bits(score.to_bits() + 1))
}

#[test]
fn far_below_one_over_u_puts_the_threshold_above_every_unknown() {
    let mut probes: Vec<Probe> = (0..10)
        .map(|i| Probe::unknown(vec![(1, 0.3 + 0.05 * i as f32)]))
        .collect();
    probes.push(Probe::known(2, vec![(2, 0.9)]));
    probes.push(Probe::known(3, vec![(3, 0.7)]));
    let highest = 0.3 + 0.05 * 9.0f32;
    let r = evaluate(&probes, &[0.0, 1e-3, 0.099], 1).unwrap();
    for d in &r.dir_at_far {
        assert_eq!(d.threshold, next_up(highest), "FAR {}", d.far);
        assert_eq!((d.false_alarms, d.dir), (0, 0.5));
    }
}

#[test]
fn short_lists_and_missing_identities_are_misses() {
    // A two-identity gallery searched at depth 5.
    let probes = vec![
        Probe::known(1, vec![(1, 0.9), (2, 0.1)]),
        Probe::known(2, vec![(1, 0.8), (2, 0.7)]),
        Probe::known(3, vec![(1, 0.8), (2, 0.7)]),
        Probe::known(1, vec![]),
        Probe::unknown(vec![(2, 0.2)]),
    ];
    let r = evaluate(&probes, &[0.0], 5).unwrap();
    assert_eq!(r.cmc, [0.25, 0.5, 0.5, 0.5, 0.5]);
    assert_eq!(r.rank1, 0.25);
    assert_eq!(
        (r.dir_at_far[0].dir, r.dir_at_far[0].false_alarms),
        (0.25, 0)
    );
}

#[test]
fn no_unknown_probes() {
    let probes = vec![
        Probe::known(1, vec![(1, 0.9)]),
        Probe::known(2, vec![(1, 0.8)]),
    ];
    // Rank-1 and CMC need no unknown probes ...
    let r = evaluate(&probes, &[], 2).unwrap();
    assert_eq!((r.rank1, r.unknown_probes), (0.5, 0));
    // ... but DIR at FAR does, and says so.
    let err = evaluate(&probes, &[0.01], 2).unwrap_err();
    assert!(matches!(err, Error::NoUnknownProbes { known: 2, .. }));
    let message = err.to_string();
    assert!(
        message.contains("unknown probes") && message.contains("0.01"),
        "{message}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    assert!(matches!(evaluate(&[], &[0.1], 5), Err(Error::Empty { .. })));
    let only_unknown = [Probe::unknown(vec![(1, 0.5)])];
    assert!(matches!(
        evaluate(&only_unknown, &[0.1], 5),
        Err(Error::NoKnownProbes { unknown: 1 })
    ));
    let probes = vec![
        Probe::known(1, vec![(1, 0.9)]),
        Probe::unknown(vec![(1, 0.5)]),
        Probe::known(2, vec![(2, 0.7), (1, f32::NAN)]),
    ];
    let err = evaluate(&probes, &[0.1], 5).unwrap_err();
    assert!(matches!(err, Error::Probe { probe: 2, .. }));
    assert!(err.to_string().starts_with("probe 2: "), "{err}");
    assert!(matches!(
        evaluate(&probes[..2], &[0.1], 0),
        Err(Error::InvalidRank { max_rank: 0, .. })
    ));
    assert!(matches!(
        evaluate(&probes[..2], &[0.1], usize::MAX),
        Err(Error::InvalidRank { max, .. }) if max == MAX_RANK
    ));
    assert!(matches!(
        evaluate(&probes[..2], &[1.01], 1),
        Err(Error::InvalidFar { .. })
    ));
}

#[test]
fn random_galleries_keep_the_invariants() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for round in 0..300 {
        let gallery = 1 + rng.below(30);
        let complete = round % 3 == 0;
        let keep = if complete {
            gallery as usize
        } else {
            1 + rng.below(gallery) as usize
        };
        let levels = [0, 10, 100][round % 3];
        let n = 2 + rng.below(150) as usize;
        let mut probes = search(&mut rng, n, gallery, keep, levels);
        probes[0].truth = Some(0);
        probes[1].truth = None;
        let mut fars: Vec<f64> = (0..6).map(|_| rng.unit()).collect();
        fars.extend([0.0, 1e-3, 0.01, 0.1, 0.5, 1.0]);
        let max_rank = gallery as usize + 2;
        let r = evaluate(&probes, &fars, max_rank).unwrap();
        let ctx = format!("round {round}");

        assert_eq!(r.cmc.len(), max_rank, "{ctx}");
        assert_eq!(r.cmc[0], r.rank1, "{ctx}");
        assert!(r.cmc.windows(2).all(|w| w[0] <= w[1]), "{ctx}");
        assert!(r.cmc.iter().all(|c| (0.0..=1.0).contains(c)), "{ctx}");
        if complete {
            assert_eq!(*r.cmc.last().unwrap(), 1.0, "{ctx}");
        }

        let u = r.unknown_probes;
        let mut by_far = r.dir_at_far.clone();
        by_far.sort_by(|a, b| a.far.total_cmp(&b.far));
        for d in &r.dir_at_far {
            assert_eq!(d.unknown_probes, u);
            assert!(
                d.false_alarms as f64 <= (d.far * u as f64).floor(),
                "{ctx}, {d:?}"
            );
            // DIR can only count probes that rank-1 counts.
            assert!(d.dir <= r.rank1, "{ctx}, {d:?}");
        }
        for w in by_far.windows(2) {
            assert!(w[0].dir <= w[1].dir, "{ctx}: {:?} then {:?}", w[0], w[1]);
            assert!(w[0].threshold >= w[1].threshold, "{ctx}");
            assert!(w[0].false_alarms <= w[1].false_alarms, "{ctx}");
        }
        // Allowing every alarm answers every probe: DIR reaches rank-1.
        let all = r.dir_at_far.iter().find(|d| d.far == 1.0).unwrap();
        assert_eq!(all.dir, r.rank1, "{ctx}");
    }
}

fn sample_report() -> OpenSetReport {
    let mut rng = XorShift(42);
    let probes = search(&mut rng, 400, 50, 20, 0);
    evaluate(&probes, &[1e-2, 0.1], 20).unwrap()
}

#[test]
fn display_is_a_small_table() {
    let r = sample_report();
    let text = r.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("probes "), "{text}");
    assert!(lines[1].starts_with("rank-1 "), "{text}");
    assert!(lines[2].contains("rank 20 "), "{text}");
    assert!(lines[4].starts_with("FAR"), "{text}");
    assert_eq!(lines.len(), 7, "{text}");
}

#[cfg(feature = "plot")]
#[test]
fn cmc_plots_are_written() {
    let dir = temp_dir("plots");
    let r = sample_report();
    let svg = dir.join("cmc.svg");
    mfn_eval::plot_cmc(&r, &svg, "random gallery").unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("random gallery"));
    let png = dir.join("cmc.png");
    mfn_eval::open_set::plot_cmc(&r, &png, "random gallery").unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 1_000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    std::fs::remove_dir_all(&dir).unwrap();
}
