//! Crash safety of a large enrollment with the HNSW index: a child process enrolls random
//! faces in batches into a gallery searched through HNSW, saving the index every few
//! batches, and is killed with SIGKILL at random moments (inside SQLite's commit, the
//! graph's update or the index file's write, wherever it happens to be). After each kill
//! the gallery is reopened: every committed batch is there whole (ids `1..=n` with `n` a
//! multiple of the batch), no batch the child reported committed is missing, the HNSW
//! index holds exactly the gallery's faces (used, caught up or rebuilt) and finds them.
//!
//! The default run enrolls 40,000 faces of 128 values (about a minute on two busy cores);
//! `kill_9_during_a_full_size_enroll` (ignored by default) does 100,000 of 512:
//!
//! ```sh
//! cargo test --release -p mfn-gallery --test durability -- --ignored --nocapture
//! ```
//!
//! The child is this test binary itself, run with `MFN_DURABILITY_CHILD` set.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mfn_gallery::{Enrollment, Fingerprint, Gallery, IndexKind};

const CHILD: &str = "MFN_DURABILITY_CHILD";

fn model() -> Fingerprint {
    Fingerprint::from_bytes([9; 32])
}

/// What a run enrolls.
#[derive(Clone, Copy, Debug)]
struct Plan {
    total: usize,
    batch: usize,
    dim: usize,
    /// Save the index every this many batches.
    flush_every: usize,
}

impl Plan {
    fn to_env(self) -> String {
        format!(
            "{} {} {} {}",
            self.total, self.batch, self.dim, self.flush_every
        )
    }

    fn from_env(text: &str) -> Self {
        let v: Vec<usize> = text.split(' ').map(|t| t.parse().unwrap()).collect();
        Self {
            total: v[0],
            batch: v[1],
            dim: v[2],
            flush_every: v[3],
        }
    }
}

/// The faces of batch `b`: random, deterministic in `b`.
fn batch(plan: Plan, b: usize) -> Vec<Enrollment> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ (b as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    (0..plan.batch)
        .map(|i| Enrollment {
            label: format!("b{b}-{}", i / 10),
            embedding: (0..plan.dim).map(|_| next()).collect(),
            source: None,
        })
        .collect()
}

/// The child: enrolls the rest of the plan, printing `committed N` after each batch.
#[test]
fn child_enroll() {
    let (Ok(db), Ok(plan)) = (std::env::var(CHILD), std::env::var("MFN_DURABILITY_PLAN")) else {
        return;
    };
    let plan = Plan::from_env(&plan);
    let mut g = Gallery::open_for(db.as_str(), &model(), plan.dim).unwrap();
    g.set_index_kind(IndexKind::hnsw());
    // Loads (catches up, rebuilds) the index, so that enrollments update it.
    g.search(&vec![1.0; plan.dim], 1).unwrap();
    let mut out = std::io::stdout();
    let mut done = 0;
    loop {
        let n = g.len().unwrap() as usize;
        if n >= plan.total {
            break;
        }
        g.enroll(&batch(plan, n / plan.batch)).unwrap();
        writeln!(out, "committed {}", n + plan.batch).unwrap();
        out.flush().unwrap();
        done += 1;
        if done % plan.flush_every == 0 {
            g.flush().unwrap();
        }
    }
    drop(g);
    writeln!(out, "finished").unwrap();
}

/// Runs the child until it finishes or `kill_after` passes; returns the last count it
/// reported committed and whether it finished.
fn run_child(db: &Path, plan: Plan, kill_after: Option<Duration>) -> (u64, bool) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_enroll", "--nocapture", "--test-threads=1"])
        .env(CHILD, db)
        .env("MFN_DURABILITY_PLAN", plan.to_env())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let committed = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let stdout = child.stdout.take().unwrap();
    let reader = {
        let (committed, finished) = (committed.clone(), finished.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The test harness may print `test child_enroll ... ` before a line.
                if let Some((_, n)) = line.rsplit_once("committed ") {
                    committed.store(n.parse().unwrap(), Ordering::SeqCst);
                } else if line.ends_with("finished") {
                    finished.store(1, Ordering::SeqCst);
                }
            }
        })
    };
    match kill_after {
        Some(after) => {
            let start = Instant::now();
            while start.elapsed() < after {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // SIGKILL: no destructor, no flush.
            let _ = child.kill();
            let _ = child.wait();
        }
        None => {
            let status = child.wait().unwrap();
            assert!(status.success(), "the child failed: {status}");
        }
    }
    reader.join().unwrap();
    (
        committed.load(Ordering::SeqCst),
        finished.load(Ordering::SeqCst) == 1,
    )
}

/// Checks the gallery after a kill: whole batches only, nothing committed lost, the HNSW
/// index exactly the gallery's faces and finding them.
fn check(db: &Path, plan: Plan, reported: u64) -> usize {
    let g = Gallery::open_for(db, &model(), plan.dim).unwrap();
    let n = g.len().unwrap() as usize;
    assert_eq!(n % plan.batch, 0, "a partial batch: {n} faces");
    assert!(
        n as u64 >= reported,
        "{reported} reported committed, {n} there"
    );
    let ids: Vec<i64> = g.list().unwrap().iter().map(|f| f.id).collect();
    assert!(ids.iter().copied().eq(1..=n as i64), "ids are not 1..={n}");
    drop(g);
    let mut g = Gallery::open_for(db, &model(), plan.dim).unwrap();
    g.set_index_kind(IndexKind::hnsw());
    assert_eq!(g.index().unwrap().len(), n);
    for b in (0..n / plan.batch).step_by(7) {
        let faces = batch(plan, b);
        for i in [0, plan.batch / 2, plan.batch - 1] {
            let hit = &g.search(&faces[i].embedding, 1).unwrap()[0];
            assert_eq!(hit.id as usize, b * plan.batch + i + 1);
            assert_eq!(hit.label, faces[i].label);
        }
    }
    n
}

/// `kills` runs of the child killed at random within `window` after their start, then
/// one to the end.
fn kill_and_check(plan: Plan, kills: usize, window: std::ops::Range<u64>) {
    let start = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("faces.db");
    drop(Gallery::create(&db, &model(), plan.dim).unwrap());
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("durability: {plan:?}, seed {seed}");
    let mut last = 0;
    for kill in 0..kills {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let after = Duration::from_millis(window.start + seed % (window.end - window.start));
        let (reported, finished) = run_child(&db, plan, Some(after));
        let n = check(&db, plan, reported);
        println!(
            "kill {kill} after {after:.1?}: {reported} reported committed, {n} in the gallery, \
             index matches{}",
            if finished {
                " (the child had finished)"
            } else {
                ""
            }
        );
        assert!(n >= last);
        last = n;
    }
    let (reported, finished) = run_child(&db, plan, None);
    assert!(finished);
    assert_eq!(check(&db, plan, reported), plan.total);
    let temps: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    println!(
        "durability: {} faces, {kills} kills, {:.1?}",
        plan.total,
        start.elapsed()
    );
}

#[test]
fn kill_9_during_a_large_enroll() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    kill_and_check(
        Plan {
            total: 40_000,
            batch: 1000,
            dim: 128,
            flush_every: 5,
        },
        5,
        200..3000,
    );
}

#[test]
#[ignore = "100,000 faces of 512 values: minutes on two cores"]
fn kill_9_during_a_full_size_enroll() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    kill_and_check(
        Plan {
            total: 100_000,
            batch: 1000,
            dim: 512,
            flush_every: 10,
        },
        6,
        // Each run adds a few hundred faces a second: kills up to a minute in land
        // across the first half of the enroll, not only its start.
        2000..60_000,
    );
}
