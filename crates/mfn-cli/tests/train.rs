//! `mfn-cli train` end to end on a few real LFW identities: a run, its checkpoint and
//! metrics, and a process killed while it writes checkpoints.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{asset, mfn, ok, stderr, tiny_set, SMALL};

#[test]
fn train_writes_a_checkpoint_metrics_and_evaluations() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tiny_set(&data, 6);
    let out = dir.path().join("run");
    let bin = asset("lfw/lfw-20pairs-protocol2.bin");
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--hold-out",
        "2",
        "--steps",
        "3",
        "--eval-every",
        "2",
        "--eval-bin",
        bin.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(SMALL);
    let o = ok(mfn(&args));
    assert!(stderr(&o).contains("2 identities"), "{}", stderr(&o));
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps = lines.iter().filter(|l| l["event"] == "step").count();
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"] == "eval").collect();
    assert_eq!(steps, 3);
    // Before training, at step 2 and at the end, each on the held-out identities' pairs
    // and the `.bin` set.
    assert_eq!(evals.len(), 3);
    assert_eq!(evals[0]["step"], 0);
    for e in evals {
        let results = e["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        for r in results {
            let auc = r["auc"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&auc), "{r}");
        }
    }
    let ckpt = mfn_model::Checkpoint::load(
        &out.join("last.safetensors"),
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(ckpt.config.name, "paper-x0.25");

    // Bad input is a clear error: an empty class folder.
    std::fs::create_dir_all(data.join("Nobody")).unwrap();
    let o = mfn(&["train", "--data", data.to_str().unwrap(), "--steps", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("Nobody"), "{}", stderr(&o));
}

#[test]
fn killing_a_run_while_it_saves_leaves_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tiny_set(&data, 4);
    let out = dir.path().join("run");
    let ckpt = out.join("last.safetensors");
    let mut kills = 0;
    let mut rounds = 0;
    while kills < 3 && rounds < 10 {
        rounds += 1;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mfn-cli"));
        cmd.arg("train");
        if ckpt.exists() {
            cmd.args(["--resume", ckpt.to_str().unwrap()]);
        }
        cmd.args([
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--steps", "100000", "--save-every", "1"])
        .args(SMALL)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        // Wait for a checkpoint newer than the one this round started from, then kill
        // at an arbitrary moment of the following writes.
        let start = Instant::now();
        let before = std::fs::metadata(&ckpt).and_then(|m| m.modified()).ok();
        loop {
            let now = std::fs::metadata(&ckpt).and_then(|m| m.modified()).ok();
            if now.is_some() && now != before {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no checkpoint written"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(37 * rounds as u64 % 200));
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        let t = mfn_train::Trainer::resume(&ckpt, &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("checkpoint after kill {kills}: {e}"));
        assert!(t.step() >= 1);
    }
    assert_eq!(kills, 3);
}
