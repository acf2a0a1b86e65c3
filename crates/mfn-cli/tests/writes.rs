//! No failed write loses data: `pack-bin`, `convert` and `train` on a full disk (a file
//! size limit, `ulimit -f`, which fails writes past it with EFBIG as a full disk fails them
//! with ENOSPC) and killed mid-write keep the previous file whole, leave no partial one,
//! and a later run removes the temporary files a killed one could not.
//!
//! Runs re-use a killed run's folder, so each run's temporary files are named after its
//! process (`.{name}.{pid}-{n}.tmp...`); the first write of a run into a folder removes
//! those of processes that are gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{asset, mfn, ok, stderr, tiny_set, SMALL};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn cli() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mfn-cli"));
    c.env(
        "MFN_HOME",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("mfn-home"),
    );
    c
}

/// `mfn-cli args` with files limited to `kib` KiB: a write past that fails as on a full
/// disk (SIGXFSZ ignored, so the write returns EFBIG instead of killing the process).
fn on_full_disk(kib: u64, args: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {kib}; exec timeout -s KILL 60 \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_mfn-cli"))
        .args(args)
        .env(
            "MFN_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("mfn-home"),
        )
        .output()
        .unwrap();
    assert!(
        !stderr(&out).contains("panicked"),
        "mfn-cli {args:?}: {}",
        stderr(&out)
    );
    out
}

/// The refusal of a failed write: exit 2 and a message naming the file.
fn assert_failed_writing(out: &Output, file: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(name.as_ref()),
        "the message must name {name}: {err}"
    );
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A temporary file as a killed process leaves it: named after a process that does not
/// exist (Linux pids stay below 2^22).
fn plant_stale_temp(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!(".{name}.2147483646-0.tmp"));
    std::fs::write(&p, b"left by a killed run").unwrap();
    p
}

/// Kills `child` after `delay` (SIGKILL), or lets it finish if it is faster.
fn kill_after(mut child: Child, delay: Duration) {
    std::thread::sleep(delay);
    let _ = child.kill();
    child.wait().unwrap();
}

/// A pairs file of LFW's first `n` same-person and first `n` different-person pairs.
fn pairs(dir: &Path, name: &str, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(asset("lfw/pairs.txt")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = format!("1\t{n}\n");
    for l in lines[1..1 + n].iter().chain(&lines[301..301 + n]) {
        out.push_str(l);
        out.push('\n');
    }
    let p = dir.join(name);
    std::fs::write(&p, out).unwrap();
    p
}

#[test]
fn pack_bin_on_a_full_disk_or_killed_keeps_the_old_set() {
    let dir = tempfile::tempdir().unwrap();
    let images = asset("lfw/aligned-112x112");
    let (small, large) = (
        pairs(dir.path(), "small.txt", 10),
        pairs(dir.path(), "large.txt", 150),
    );
    let sets = dir.path().join("sets");
    std::fs::create_dir(&sets).unwrap();
    let out = sets.join("lfw.bin");
    let pack = |pairs: &Path| {
        let mut c = cli();
        c.args([
            "pack-bin",
            "--pairs",
            s(pairs),
            "--images",
            s(&images),
            "--out",
            s(&out),
        ]);
        c
    };
    let run = |pairs: &Path| ok(pack(pairs).output().unwrap());
    run(&large);
    let large_bytes = std::fs::read(&out).unwrap();
    run(&small);
    let small_bytes = std::fs::read(&out).unwrap();
    assert!(small_bytes.len() < large_bytes.len() / 4);

    // Full disk: the new set does not fit in 4x the old one's size limit.
    let limit = (small_bytes.len() as u64 / 1024 + 1) * 4;
    let o = on_full_disk(
        limit,
        &[
            "pack-bin",
            "--pairs",
            s(&large),
            "--images",
            s(&images),
            "--out",
            s(&out),
        ],
    );
    assert_failed_writing(&o, &out);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        small_bytes,
        "the old set changed"
    );
    assert_eq!(names(&sets), ["lfw.bin"]);

    // Killed at moments spread over a run: the set is the old one or the whole new one.
    let start = Instant::now();
    run(&large);
    let took = start.elapsed();
    run(&small);
    for k in 0..6u32 {
        let child = pack(&large)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        kill_after(child, took * k / 5);
        let now = std::fs::read(&out).unwrap();
        assert!(
            now == small_bytes || now == large_bytes,
            "kill {k}: a set of {} bytes is neither the old nor the new one",
            now.len()
        );
    }
    // What a killed run left is removed by the next one.
    plant_stale_temp(&sets, "lfw.bin");
    run(&small);
    assert_eq!(names(&sets), ["lfw.bin"]);
}

#[test]
fn convert_on_a_full_disk_or_killed_keeps_the_old_model() {
    let dir = tempfile::tempdir().unwrap();
    let symbol = asset("models/mobilefacenet-y1/model-symbol.json");
    let out = dir.path().join("y1.safetensors");
    let convert = |threshold: &str| {
        let mut c = cli();
        c.args(["convert", "--threshold", threshold, s(&symbol), s(&out)]);
        c
    };
    let threshold = || -> String {
        mfn_model::Checkpoint::load(&out, None, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"))
            .metadata["mfn.threshold"]
            .clone()
    };
    ok(convert("0.25").output().unwrap());
    let old = std::fs::read(&out).unwrap();

    let o = on_full_disk(
        1024,
        &["convert", "--threshold", "0.3", s(&symbol), s(&out)],
    );
    assert_failed_writing(&o, &out);
    assert_eq!(std::fs::read(&out).unwrap(), old, "the old model changed");
    assert_eq!(names(dir.path()), ["y1.safetensors"]);

    let start = Instant::now();
    ok(convert("0.25").output().unwrap());
    let took = start.elapsed();
    for k in 0..6u32 {
        let t = if k % 2 == 0 { "0.3" } else { "0.25" };
        let child = convert(t)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        kill_after(child, took * k / 5);
        // Whole: it loads, with one of the two thresholds.
        let now = threshold();
        assert!(now == "0.3" || now == "0.25", "kill {k}: threshold {now}");
    }
    plant_stale_temp(dir.path(), "y1.safetensors");
    ok(convert("0.3").output().unwrap());
    assert_eq!(threshold(), "0.3");
    assert_eq!(names(dir.path()), ["y1.safetensors"]);
}

/// The steps `metrics.jsonl` logs, in order.
fn logged_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["metrics"]["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn train_on_a_full_disk_or_killed_resumes_with_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tiny_set(&data, 4);
    let run = dir.path().join("run");
    let ckpt = run.join("last.safetensors");
    let mut child = cli()
        .args(["train", "--data", s(&data), "--out", s(&run)])
        .args(["--steps", "12", "--save-every", "2"])
        .args(SMALL)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed a moment after its first checkpoint, with steps logged past it.
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let at = mfn_train::Trainer::saved_settings(&ckpt).unwrap().step;
    assert!(at < 12, "the run ended before the kill");

    // A full disk fails the next checkpoint: the old one stays, whole.
    let old = std::fs::read(&ckpt).unwrap();
    let o = on_full_disk(200, &["train", "--resume", s(&ckpt)]);
    assert_failed_writing(&o, &ckpt);
    assert_eq!(std::fs::read(&ckpt).unwrap(), old, "the checkpoint changed");

    // The resume takes the run's data and settings from the checkpoint, and logs each
    // step once; nothing temporary is left.
    plant_stale_temp(&run, "last.safetensors");
    let o = ok(mfn(&["train", "--resume", s(&ckpt)]));
    let err = stderr(&o);
    assert!(err.contains(&format!("from step {at}")), "{err}");
    // Without a terminal, progress comes as lines.
    assert!(
        err.contains("step 12/12: loss") && err.contains("img/s"),
        "{err}"
    );
    assert_eq!(logged_steps(&run), (1..=12).collect::<Vec<_>>());
    assert_eq!(names(&run), ["last.safetensors", "metrics.jsonl"]);
}

#[test]
fn train_keeps_a_run_unless_resumed_extended_or_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tiny_set(&data, 4);
    let run = dir.path().join("run");
    let ckpt = run.join("last.safetensors");
    let mut first = vec![
        "train",
        "--data",
        s(&data),
        "--hold-out",
        "2",
        "--out",
        s(&run),
    ];
    first.extend(["--steps", "2"]);
    first.extend(SMALL);
    ok(mfn(&first));
    let (old_ckpt, old_log) = (
        std::fs::read(&ckpt).unwrap(),
        std::fs::read(run.join("metrics.jsonl")).unwrap(),
    );

    // Another run into the same folder is refused, and touches nothing.
    let o = mfn(&first);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&ckpt).unwrap(), old_ckpt);
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), old_log);

    // A finished run resumed without a new total, or with one it has passed, is refused.
    let o = mfn(&["train", "--resume", s(&ckpt)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--steps"), "{}", stderr(&o));
    let o = mfn(&["train", "--resume", s(&ckpt), "--steps", "2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--steps 2"), "{}", stderr(&o));
    // A setting of its own is not silently replaced.
    let o = mfn(&["train", "--resume", s(&ckpt), "--steps", "4", "--lr", "0.1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--lr"), "{}", stderr(&o));

    // --steps extends it to that total, on the run's data (2 identities held out, without
    // --hold-out here) and settings (the same flags repeated are fine).
    let o = ok(mfn(&[
        "train",
        "--resume",
        s(&ckpt),
        "--steps",
        "4",
        "--batch",
        "8",
    ]));
    let err = stderr(&o);
    assert!(err.contains("4 steps of 8, from step 2"), "{err}");
    assert!(err.contains("of 2 identities"), "{err}");
    assert_eq!(logged_steps(&run), [1, 2, 3, 4]);
    assert_eq!(mfn_train::Trainer::saved_settings(&ckpt).unwrap().step, 4);

    // --overwrite starts over.
    let mut again = first.clone();
    again.push("--overwrite");
    ok(mfn(&again));
    assert_eq!(logged_steps(&run), [1, 2]);
    assert_eq!(names(&run), ["last.safetensors", "metrics.jsonl"]);
}
