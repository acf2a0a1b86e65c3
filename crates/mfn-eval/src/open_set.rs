//! Open-set (1:N) identification: rank-1, CMC and DIR at FAR from the ranked
//! candidate lists of a gallery search, as in IJB-C's 1:N protocol and NIST
//! FRVT 1:N (Grother et al.).

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kfold::next_up;

#[cfg(feature = "plot")]
pub use crate::plot::plot_cmc;

/// The deepest CMC rank [`evaluate`] accepts; it bounds the curve's allocation
/// whatever `max_rank` a caller passes.
pub const MAX_RANK: usize = 1 << 20;

/// One probe's search result: the identity it truly has in the gallery
/// (`None`: not enrolled, an "unknown" probe) and its candidates, best first:
/// (gallery identity, similarity score).
///
/// Only the first occurrence of an identity in `candidates` counts: later
/// duplicates are skipped and do not push the identities after them down a
/// rank. A list may be shorter than the deepest rank of interest (a small
/// gallery) or empty; missing ranks are misses, and an unknown probe with no
/// candidate never raises a false alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// The gallery identity of the probe's subject, or `None` when the subject is not enrolled.
    pub truth: Option<u32>,
    /// Gallery identities with their similarity to the probe, highest similarity first.
    pub candidates: Vec<(u32, f32)>,
}

impl Probe {
    /// A probe whose subject is enrolled as `truth`.
    pub fn known(truth: u32, candidates: Vec<(u32, f32)>) -> Self {
        Self {
            truth: Some(truth),
            candidates,
        }
    }

    /// A probe whose subject is not in the gallery.
    pub fn unknown(candidates: Vec<(u32, f32)>) -> Self {
        Self {
            truth: None,
            candidates,
        }
    }

    /// The best candidate's score, widened to `f64` so thresholds can sit between `f32` values.
    fn top_score(&self) -> Option<f64> {
        self.candidates.first().map(|&(_, s)| f64::from(s))
    }

    /// Rejects scores and orderings the metrics cannot rank, naming the probe.
    fn validate(&self, probe: usize) -> Result<()> {
        let wrap = |cause| Error::Probe {
            probe,
            cause: Box::new(cause),
        };
        let mut previous = f32::INFINITY;
        for (index, &(_, score)) in self.candidates.iter().enumerate() {
            if !score.is_finite() {
                return Err(wrap(Error::NonFinite {
                    what: "candidate scores",
                    index,
                    value: f64::from(score),
                }));
            }
            // Ties are fine; a rise means the list is not best first (a distance
            // sorted ascending, say), and every rank would be meaningless.
            if score > previous {
                return Err(wrap(Error::NotBestFirst {
                    index,
                    score,
                    previous,
                }));
            }
            previous = score;
        }
        Ok(())
    }
}

/// Detection and identification rate at one false alarm rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirAtFar {
    /// The requested false alarm rate (FAR, sometimes FPIR).
    pub far: f64,
    /// Score threshold: a probe is answered when its top-1 score is `>= threshold`.
    /// It lies on an `f32` value, so comparing `f32` scores with `threshold as f32`
    /// decides exactly as comparing them widened to `f64`.
    pub threshold: f64,
    /// Fraction of known probes whose top-1 candidate is their true identity
    /// and scores at least `threshold`.
    pub dir: f64,
    /// Unknown probes whose top-1 score reaches `threshold`.
    pub false_alarms: usize,
    /// All unknown probes, so `false_alarms / unknown_probes` is the achieved FAR.
    pub unknown_probes: usize,
}

/// Everything [`evaluate`] measures, ready to serialise as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenSetReport {
    /// Probes whose subject is in the gallery.
    pub known_probes: usize,
    /// Probes whose subject is not in the gallery.
    pub unknown_probes: usize,
    /// Closed-set rank-1 identification rate over the known probes; equal to `cmc[0]`.
    pub rank1: f64,
    /// Cumulative match characteristic: `cmc[r - 1]` is the fraction of known
    /// probes whose true identity is among their top `r` distinct candidates,
    /// for `r = 1..=max_rank`.
    pub cmc: Vec<f64>,
    /// DIR at each requested false alarm rate, in request order.
    pub dir_at_far: Vec<DirAtFar>,
}

/// Computes rank-1, the CMC curve up to `max_rank` and DIR at every entry of `fars`.
///
/// Rank-1 and CMC are closed-set numbers over the known probes (unknown
/// probes are ignored); a known probe whose identity is missing from its
/// list, or sits deeper than the list reaches, is a miss at every rank it is
/// not found by.
///
/// For a FAR `f` with `U` unknown probes, the threshold `t` is the smallest
/// score at which at most `k = floor(f * U)` unknown probes have a top-1
/// score `>= t`, and DIR is the fraction of known probes whose top-1
/// candidate is their true identity with a top-1 score `>= t`:
///
/// - `k` is the largest count with `k / U <= f`, the test
///   [`crate::tar_at_far`] applies, so `f = 0.29, U = 100` allows 29 even
///   though `0.29 * 100` rounds to `28.999…`.
/// - Ties are resolved conservatively: `t` is just above the `(k + 1)`-th
///   highest unknown top-1 score (the next `f32`, so `threshold as f32` is
///   the same threshold), so every probe tied at that score, known or
///   unknown, is rejected. The counted false alarms may then fall below `k`,
///   but never exceed it.
/// - When `f * U < 1`, `t` is just above the highest unknown top-1 score.
/// - When `k` lets every unknown probe alarm, `t` is the lowest top-1 score
///   of any probe, so every probe is answered (`f64::MIN` if no probe has a
///   candidate).
///
/// Time is `O(C + P log P + F log P)` for `C` candidates, `P` probes and `F`
/// FARs; memory beyond the report is `O(P)` plus one set as large as the
/// longest scanned prefix of a candidate list.
///
/// # Errors
/// [`Error::Empty`] when `probes` is empty, [`Error::InvalidRank`] unless
/// `1 <= max_rank <= MAX_RANK`, [`Error::InvalidFar`] for a FAR outside
/// `[0, 1]`, [`Error::Probe`] for a non-finite candidate score or a list that
/// is not sorted best first, [`Error::NoKnownProbes`] when every probe is
/// unknown, and [`Error::NoUnknownProbes`] when `fars` is not empty but
/// every probe is known (no threshold can be set without unknown probes).
pub fn evaluate(probes: &[Probe], fars: &[f64], max_rank: usize) -> Result<OpenSetReport> {
    if probes.is_empty() {
        return Err(Error::Empty { what: "probes" });
    }
    if !(1..=MAX_RANK).contains(&max_rank) {
        return Err(Error::InvalidRank {
            max_rank,
            max: MAX_RANK,
        });
    }
    if let Some(&far) = fars.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        return Err(Error::InvalidFar { far });
    }
    for (i, probe) in probes.iter().enumerate() {
        probe.validate(i)?;
    }
    let known_probes = probes.iter().filter(|p| p.truth.is_some()).count();
    let unknown_probes = probes.len() - known_probes;
    if known_probes == 0 {
        return Err(Error::NoKnownProbes {
            unknown: unknown_probes,
        });
    }
    if unknown_probes == 0 {
        if let Some(&far) = fars.first() {
            return Err(Error::NoUnknownProbes {
                far,
                known: known_probes,
            });
        }
    }

    let cmc = cmc(probes, max_rank, known_probes);

    // Top-1 scores sorted descending: unknown probes (each a potential false
    // alarm) and known probes whose top-1 is right (each a potential detection).
    let mut alarms: Vec<f32> = Vec::with_capacity(unknown_probes);
    let mut hits: Vec<f32> = Vec::with_capacity(known_probes);
    for p in probes {
        match (p.truth, p.candidates.first()) {
            (None, Some(&(_, s))) => alarms.push(s),
            (Some(truth), Some(&(id, s))) if id == truth => hits.push(s),
            _ => {}
        }
    }
    alarms.sort_unstable_by(|a, b| b.total_cmp(a));
    hits.sort_unstable_by(|a, b| b.total_cmp(a));
    let lowest_top = probes
        .iter()
        .filter_map(Probe::top_score)
        .fold(None, |lo: Option<f64>, s| Some(lo.map_or(s, |l| l.min(s))));

    let dir_at_far = fars
        .iter()
        .map(|&far| {
            let budget = alarm_budget(far, unknown_probes);
            let threshold = match alarms.get(budget) {
                // The (budget + 1)-th highest alarm, and everything tied with it, must stay out.
                Some(&excluded) => just_above(excluded),
                None => lowest_top.unwrap_or(f64::MIN),
            };
            let false_alarms = alarms.partition_point(|&s| f64::from(s) >= threshold);
            let detected = hits.partition_point(|&s| f64::from(s) >= threshold);
            DirAtFar {
                far,
                threshold,
                dir: detected as f64 / known_probes as f64,
                false_alarms,
                unknown_probes,
            }
        })
        .collect();

    Ok(OpenSetReport {
        known_probes,
        unknown_probes,
        rank1: cmc[0],
        cmc,
        dir_at_far,
    })
}

/// The CMC curve over the known probes; `known` is their number, at least one.
fn cmc(probes: &[Probe], max_rank: usize, known: usize) -> Vec<f64> {
    // found_at[r - 1] counts known probes whose identity is at rank r exactly.
    let mut found_at = vec![0usize; max_rank];
    let mut seen = HashSet::new();
    for p in probes {
        let Some(truth) = p.truth else { continue };
        if let Some(rank) = true_rank(truth, &p.candidates, max_rank, &mut seen) {
            found_at[rank - 1] += 1;
        }
    }
    let mut cumulative = 0usize;
    found_at
        .into_iter()
        .map(|n| {
            cumulative += n;
            cumulative as f64 / known as f64
        })
        .collect()
}

/// The 1-based rank of `truth` among the distinct identities of `candidates`,
/// or `None` when it is not within the first `max_rank` of them.
///
/// `seen` is scratch space reused across probes, so only one set is ever allocated.
fn true_rank(
    truth: u32,
    candidates: &[(u32, f32)],
    max_rank: usize,
    seen: &mut HashSet<u32>,
) -> Option<usize> {
    seen.clear();
    for &(id, _) in candidates {
        if id == truth {
            return Some(seen.len() + 1);
        }
        // Stopping once `max_rank` other identities are ahead bounds both the
        // work and the set, however long the list.
        if seen.insert(id) && seen.len() >= max_rank {
            return None;
        }
    }
    None
}

/// The smallest threshold that rejects `score`: the next `f32` up, widened, so
/// that `score >= threshold` gives the same answer whether a caller compares
/// in `f64` or in `f32` after `threshold as f32`.
fn just_above(score: f32) -> f64 {
    if score == f32::MAX {
        // The next f32 would be infinite, which JSON cannot carry.
        return next_up(f64::from(score));
    }
    let bits = score.to_bits();
    let up = if score == 0.0 {
        f32::from_bits(1)
    } else if score > 0.0 {
        f32::from_bits(bits + 1)
    } else {
        f32::from_bits(bits - 1)
    };
    f64::from(up)
}

/// The most false alarms a FAR allows among `unknown` probes: the largest
/// `k <= unknown` with `k / unknown <= far`, i.e. `floor(far * unknown)` without
/// its rounding trap.
fn alarm_budget(far: f64, unknown: usize) -> usize {
    if unknown == 0 {
        return 0;
    }
    let u = unknown as f64;
    // `as` saturates, and `far` is already known to lie in [0, 1].
    let mut k = ((far * u).floor() as usize).min(unknown);
    // The product is within an ulp or two of the exact value, so these loops
    // run at most a couple of times.
    while k < unknown && (k + 1) as f64 / u <= far {
        k += 1;
    }
    while k > 0 && k as f64 / u > far {
        k -= 1;
    }
    k
}

/// The ranks a summary line shows: 1, 5, 10, 20, 50, 100, … up to the curve's depth, and the depth itself.
fn summary_ranks(depth: usize) -> Vec<usize> {
    let mut ranks = vec![1];
    let mut base = 1usize;
    'outer: loop {
        for m in [5, 10, 20] {
            let r = base.saturating_mul(m);
            if r >= depth {
                break 'outer;
            }
            ranks.push(r);
        }
        base = base.saturating_mul(10);
    }
    if depth > 1 {
        ranks.push(depth);
    }
    ranks
}

impl fmt::Display for OpenSetReport {
    /// A small table: probe counts, rank-1, CMC at a few ranks and one line per FAR.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "probes     {} known, {} unknown",
            self.known_probes, self.unknown_probes
        )?;
        writeln!(f, "rank-1     {:.3}%", self.rank1 * 100.0)?;
        let cmc = summary_ranks(self.cmc.len())
            .into_iter()
            .filter_map(|r| {
                let rate = self.cmc.get(r - 1)?;
                Some(format!("rank {r} {:.3}%", rate * 100.0))
            })
            .collect::<Vec<_>>()
            .join(", ");
        write!(f, "CMC        {cmc}")?;
        if self.dir_at_far.is_empty() {
            return Ok(());
        }
        writeln!(f)?;
        writeln!(f)?;
        write!(f, "FAR              DIR   threshold   false alarms")?;
        for d in &self.dir_at_far {
            write!(
                f,
                "\n{:<10} {:>8.3}%   {:>9.4}   {} of {}",
                d.far,
                d.dir * 100.0,
                d.threshold,
                d.false_alarms,
                d.unknown_probes
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Lcg;

    fn known(truth: u32, c: &[(u32, f32)]) -> Probe {
        Probe::known(truth, c.to_vec())
    }

    fn unknown(c: &[(u32, f32)]) -> Probe {
        Probe::unknown(c.to_vec())
    }

    /// Four known probes at ranks 1, 2, 3 and nowhere, and five unknown probes.
    fn small() -> Vec<Probe> {
        vec![
            known(1, &[(1, 0.9), (2, 0.5), (3, 0.1)]),
            known(2, &[(1, 0.7), (2, 0.6), (3, 0.2)]),
            known(3, &[(1, 0.8), (2, 0.4), (3, 0.3)]),
            known(4, &[(1, 0.6), (2, 0.5), (3, 0.4)]),
            unknown(&[(2, 0.85), (1, 0.1)]),
            unknown(&[(3, 0.65)]),
            unknown(&[(1, 0.65)]),
            unknown(&[(2, 0.3)]),
            unknown(&[]),
        ]
    }

    #[test]
    fn rank1_and_cmc_by_hand() {
        let r = evaluate(&small(), &[], 4).unwrap();
        assert_eq!((r.known_probes, r.unknown_probes), (4, 5));
        assert_eq!(r.rank1, 0.25);
        assert_eq!(r.cmc, [0.25, 0.5, 0.75, 0.75]);
        assert!(r.dir_at_far.is_empty());
    }

    #[test]
    fn dir_by_hand_with_ties_at_the_threshold() {
        // Unknown top-1 scores: 0.85, 0.65, 0.65, 0.3 and one empty list (U = 5).
        // The only correct top-1 is probe 0 at 0.9.
        let r = evaluate(&small(), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], 3).unwrap();
        let got: Vec<(usize, f64)> = r
            .dir_at_far
            .iter()
            .map(|d| (d.false_alarms, d.dir))
            .collect();
        // FAR 0.4 allows two alarms, but the 2nd and 3rd tie at 0.65: both stay out.
        assert_eq!(
            got,
            [
                (0, 0.25),
                (1, 0.25),
                (1, 0.25),
                (3, 0.25),
                (4, 0.25),
                (4, 0.25)
            ]
        );
        let t: Vec<f64> = r.dir_at_far.iter().map(|d| d.threshold).collect();
        assert_eq!(t[0], just_above(0.85));
        assert_eq!(t[1], just_above(0.65));
        assert_eq!(t[2], t[1]);
        assert_eq!(t[3], just_above(0.3));
        // Every unknown may alarm: the threshold drops to the lowest top-1 of any probe.
        assert_eq!(t[4], f64::from(0.3f32));
        assert_eq!(t[5], t[4]);
        assert!(r.dir_at_far.iter().all(|d| d.unknown_probes == 5));
    }

    #[test]
    fn dir_counts_known_probes_tied_with_the_excluded_alarm_as_misses() {
        let probes = [
            known(1, &[(1, 0.5)]),
            known(2, &[(2, 0.6)]),
            unknown(&[(1, 0.5)]),
            unknown(&[(1, 0.2)]),
        ];
        // FAR 0.5 of U = 2 allows one alarm: the threshold sits just above the second (0.2).
        let r = evaluate(&probes, &[0.0, 0.5], 1).unwrap();
        let (strict, loose) = (r.dir_at_far[0], r.dir_at_far[1]);
        // k = 0: just above 0.5, so the known probe tied at 0.5 is rejected with the alarm.
        assert_eq!(
            (strict.dir, strict.false_alarms, strict.threshold),
            (0.5, 0, just_above(0.5))
        );
        assert_eq!((loose.dir, loose.false_alarms), (1.0, 1));
        assert_eq!(loose.threshold, just_above(0.2));
    }

    #[test]
    fn far_below_one_unknown() {
        // f * U < 1: the threshold sits just above the highest unknown top-1.
        let mut probes = vec![known(7, &[(7, 0.95)]), known(8, &[(8, 0.7)])];
        probes.extend((0..50).map(|i| unknown(&[(1, 0.1 + 0.01 * i as f32)])));
        let r = evaluate(&probes, &[1e-3, 0.019, 0.02], 1).unwrap();
        let highest = 0.1f32 + 0.01 * 49.0;
        assert_eq!(r.dir_at_far[0].threshold, just_above(highest));
        assert_eq!(
            (r.dir_at_far[0].false_alarms, r.dir_at_far[0].dir),
            (0, 1.0)
        );
        assert_eq!(r.dir_at_far[1].false_alarms, 0);
        assert_eq!(r.dir_at_far[2].false_alarms, 1);
    }

    #[test]
    fn alarm_budget_avoids_the_rounding_trap() {
        assert_eq!((0.29f64 * 100.0).floor(), 28.0);
        assert_eq!(alarm_budget(0.29, 100), 29);
        assert_eq!(alarm_budget(0.0, 100), 0);
        assert_eq!(alarm_budget(1.0, 100), 100);
        assert_eq!(alarm_budget(1e-3, 999), 0);
        assert_eq!(alarm_budget(1e-3, 1000), 1);
        assert_eq!(alarm_budget(0.5, 0), 0);
        for u in 1..300usize {
            for far in [1e-4, 1e-3, 0.01, 0.07, 0.1, 0.29, 0.3, 0.33, 0.5, 0.7, 0.99] {
                let k = alarm_budget(far, u);
                assert!(k as f64 / u as f64 <= far, "far {far}, U {u}");
                assert!(
                    k == u || (k + 1) as f64 / u as f64 > far,
                    "far {far}, U {u}"
                );
                assert!(k.abs_diff((far * u as f64).floor() as usize) <= 1);
            }
        }
    }

    #[test]
    fn thresholds_sit_on_the_next_f32() {
        assert_eq!(just_above(0.0), f64::from(f32::from_bits(1)));
        assert_eq!(just_above(-0.0), f64::from(f32::from_bits(1)));
        assert_eq!(just_above(-1.0), f64::from(-1.0f32 + f32::EPSILON / 2.0));
        assert!(just_above(f32::MAX).is_finite() && just_above(f32::MAX) > f64::from(f32::MAX));
        let mut rng = Lcg::new(8);
        for _ in 0..10_000 {
            let s = f32::from_bits(rng.next_u32());
            if !s.is_finite() || s == f32::MAX {
                continue;
            }
            let t = just_above(s);
            assert!(
                f64::from(s) < t && s < t as f32 && f64::from(t as f32) == t,
                "{s}"
            );
        }
    }

    #[test]
    fn duplicates_count_once() {
        // Identity 5 repeats; the repeat neither counts nor pushes 6 down to rank 3.
        let probes = [
            known(6, &[(5, 0.9), (5, 0.8), (6, 0.7)]),
            known(5, &[(5, 0.9), (5, 0.9)]),
        ];
        let r = evaluate(&probes, &[], 3).unwrap();
        assert_eq!(r.cmc, [0.5, 1.0, 1.0]);
        // Repeats do not use up the rank budget either.
        let deep = [known(9, &[(1, 0.9), (1, 0.8), (1, 0.7), (9, 0.6)])];
        assert_eq!(evaluate(&deep, &[], 2).unwrap().cmc, [0.0, 1.0]);
    }

    #[test]
    fn short_and_empty_lists_are_misses() {
        let probes = [
            known(1, &[(1, 0.9)]),
            known(2, &[(1, 0.9)]),
            known(3, &[]),
            known(4, &[(1, 0.3), (4, 0.2)]),
            unknown(&[]),
        ];
        let r = evaluate(&probes, &[0.0, 1.0], 5).unwrap();
        assert_eq!(r.cmc, [0.25, 0.5, 0.5, 0.5, 0.5]);
        // An unknown probe without candidates never alarms.
        assert!(r
            .dir_at_far
            .iter()
            .all(|d| d.false_alarms == 0 && d.dir == 0.25));
        // No unknown has a score, so even FAR 0 leaves the lowest top-1 as threshold.
        assert_eq!(r.dir_at_far[0].threshold, f64::from(0.3f32));
        let nothing = [known(1, &[]), unknown(&[])];
        let r = evaluate(&nothing, &[0.5], 2).unwrap();
        assert_eq!(r.dir_at_far[0].threshold, f64::MIN);
        assert_eq!((r.rank1, r.dir_at_far[0].dir), (0.0, 0.0));
    }

    #[test]
    fn errors() {
        let ok = small();
        assert!(matches!(
            evaluate(&[], &[], 1),
            Err(Error::Empty { what: "probes" })
        ));
        for bad in [0, MAX_RANK + 1, usize::MAX] {
            assert!(matches!(
                evaluate(&ok, &[], bad),
                Err(Error::InvalidRank { max_rank, .. }) if max_rank == bad
            ));
        }
        for far in [f64::NAN, -0.1, 1.5] {
            assert!(matches!(
                evaluate(&ok, &[0.1, far], 1),
                Err(Error::InvalidFar { .. })
            ));
        }
        let mut nan = ok.clone();
        nan[3].candidates[2].1 = f32::NAN;
        let err = evaluate(&nan, &[], 1).unwrap_err();
        assert!(matches!(&err, Error::Probe { probe: 3, cause }
            if matches!(**cause, Error::NonFinite { index: 2, .. })));
        assert_eq!(
            err.to_string(),
            "probe 3: candidate scores[2] is not finite (NaN)"
        );
        let mut inf = ok.clone();
        inf[6].candidates[0].1 = f32::INFINITY;
        assert!(matches!(
            evaluate(&inf, &[], 1),
            Err(Error::Probe { probe: 6, .. })
        ));
        let mut unsorted = ok.clone();
        unsorted[1].candidates.swap(0, 2);
        let err = evaluate(&unsorted, &[], 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "probe 1: candidate 1 scores 0.6, above the candidate ranked before it (0.2); \
             candidates must be sorted best first"
        );
        let all_unknown = [unknown(&[(1, 0.5)])];
        assert!(matches!(
            evaluate(&all_unknown, &[], 1),
            Err(Error::NoKnownProbes { unknown: 1 })
        ));
        let all_known = [known(1, &[(1, 0.5)])];
        assert!(evaluate(&all_known, &[], 1).is_ok());
        let err = evaluate(&all_known, &[1e-3], 1).unwrap_err();
        assert!(matches!(err, Error::NoUnknownProbes { known: 1, .. }));
        assert!(err.to_string().contains("FAR 0.001"), "{err}");
    }

    /// Slow reference: try every threshold that matters and keep the lowest within budget.
    fn brute_force_dir(probes: &[Probe], far: f64) -> (f64, usize) {
        let unknown = probes.iter().filter(|p| p.truth.is_none()).count();
        let budget = alarm_budget(far, unknown);
        let mut candidates: Vec<f64> = probes
            .iter()
            .filter_map(|p| p.candidates.first())
            .flat_map(|&(_, s)| [f64::from(s), just_above(s)])
            .collect();
        candidates.push(f64::MIN);
        let alarms_at = |t: f64| {
            probes
                .iter()
                .filter(|p| p.truth.is_none() && p.top_score().is_some_and(|s| s >= t))
                .count()
        };
        let t = candidates
            .into_iter()
            .filter(|&t| alarms_at(t) <= budget)
            .fold(f64::INFINITY, f64::min);
        let known: Vec<&Probe> = probes.iter().filter(|p| p.truth.is_some()).collect();
        let hits = known
            .iter()
            .filter(|p| {
                p.candidates
                    .first()
                    .is_some_and(|&(id, s)| Some(id) == p.truth && f64::from(s) >= t)
            })
            .count();
        (hits as f64 / known.len() as f64, alarms_at(t))
    }

    #[test]
    fn dir_matches_brute_force() {
        let mut rng = Lcg::new(2024);
        for round in 0..200 {
            let n = 2 + rng.below(40) as usize;
            let gallery = 1 + rng.below(6);
            let levels = if round % 2 == 0 { 4 } else { 1000 };
            let mut probes: Vec<Probe> = (0..n)
                .map(|_| {
                    let len = rng.below(gallery + 1) as usize;
                    let mut c: Vec<(u32, f32)> = (0..len)
                        .map(|_| (rng.below(gallery), rng.below(levels) as f32 / levels as f32))
                        .collect();
                    c.sort_by(|a, b| b.1.total_cmp(&a.1));
                    let truth = (rng.below(3) > 0).then(|| rng.below(gallery));
                    Probe {
                        truth,
                        candidates: c,
                    }
                })
                .collect();
            probes[0].truth = Some(0);
            probes[1].truth = None;
            let fars = [0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0];
            let r = evaluate(&probes, &fars, 3).unwrap();
            for d in &r.dir_at_far {
                assert_eq!(
                    (d.dir, d.false_alarms),
                    brute_force_dir(&probes, d.far),
                    "round {round}, far {}",
                    d.far
                );
                // The same threshold in f32 counts the same alarms.
                let in_f32 = probes
                    .iter()
                    .filter(|p| p.truth.is_none())
                    .filter(|p| {
                        p.candidates
                            .first()
                            .is_some_and(|c| c.1 >= d.threshold as f32)
                    })
                    .count();
                assert_eq!(in_f32, d.false_alarms, "round {round}");
            }
        }
    }

    #[test]
    fn summary_ranks_and_display() {
        assert_eq!(summary_ranks(1), [1]);
        assert_eq!(summary_ranks(3), [1, 3]);
        assert_eq!(summary_ranks(5), [1, 5]);
        assert_eq!(summary_ranks(20), [1, 5, 10, 20]);
        assert_eq!(summary_ranks(30), [1, 5, 10, 20, 30]);
        assert_eq!(summary_ranks(100), [1, 5, 10, 20, 50, 100]);
        assert_eq!(summary_ranks(MAX_RANK).len(), 19);
        let r = evaluate(&small(), &[0.2, 1.0], 3).unwrap();
        let text = r.to_string();
        assert!(
            text.starts_with("probes     4 known, 5 unknown\nrank-1     25.000%\n"),
            "{text}"
        );
        assert!(
            text.contains("CMC        rank 1 25.000%, rank 3 75.000%"),
            "{text}"
        );
        assert!(
            text.contains("0.2          25.000%      0.6500   1 of 5"),
            "{text}"
        );
        assert!(!text.ends_with('\n'));
        let bare = evaluate(&small(), &[], 1).unwrap().to_string();
        assert!(bare.ends_with("CMC        rank 1 25.000%"), "{bare}");
    }

    #[test]
    fn report_round_trips_through_json() {
        let r = evaluate(&small(), &[0.2, 1.0], 3).unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"dir_at_far\":[{\"far\":0.2,"), "{json}");
        let back: OpenSetReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.cmc, r.cmc);
        assert_eq!(back.dir_at_far.len(), 2);
        assert_eq!(back.dir_at_far[0].false_alarms, 1);
        let probe: Probe =
            serde_json::from_str(r#"{"truth":null,"candidates":[[3,0.5]]}"#).unwrap();
        assert_eq!(probe, unknown(&[(3, 0.5)]));
    }
}
