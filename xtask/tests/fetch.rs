//! `cargo xtask fetch` against a Hub cache built here in the Hub's own layout, holding the
//! `mbf` export of the assets as `recognition/model.onnx`: the files resolve through
//! `hf-hub`, the sha256 pin is enforced, and without the file and the network the error
//! says what to download and where.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{asset, fails, ok, write, xtask};
use mfn_model::{Checkpoint, Config};
use sha2::{Digest, Sha256};

const REPO: &str = "test-org/buffalo_s";
const FILE: &str = "recognition/model.onnx";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const MODEL: &str = "models/mbf-onnx-export/mbf-random-weights.onnx";

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lays `content` out as the Hub cache does: the bytes in `blobs/<sha256>`, the snapshot
/// file a relative link to the blob, and `refs/main` naming the commit. Returns the
/// snapshot path.
fn hub_cache(cache: &Path, content: &[u8]) -> PathBuf {
    let repo = cache.join(format!("models--{}", REPO.replace('/', "--")));
    let blob = repo.join("blobs").join(sha256(content));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, content).unwrap();
    let snapshot = repo.join("snapshots").join(COMMIT).join(FILE);
    std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        Path::new("../../..").join("blobs").join(sha256(content)),
        &snapshot,
    )
    .unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&blob, &snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    snapshot
}

fn models_list(dir: &Path, sha: Option<&str>, extra: &str) -> PathBuf {
    let sha = sha.map_or("null".to_string(), |s| format!("\"{s}\""));
    write(
        dir,
        "models.json",
        &format!(
            r#"{{"models": [{{"name": "mbf-test", "repo": "{REPO}", "file": "{FILE}",
                "revision": "main", "sha256": {sha}, "preset": "mbf"{extra}}}]}}"#
        ),
    )
}

#[test]
fn resolves_checks_and_converts_from_the_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let onnx = std::fs::read(asset(MODEL)).unwrap();
    let sha = sha256(&onnx);
    let cache = tmp.path().join("hub");
    let snapshot = hub_cache(&cache, &onnx);
    let out = tmp.path().join("out");
    let list = models_list(
        tmp.path(),
        Some(&sha),
        r#", "threshold_set": "lfw/lfw-20pairs-protocol2.bin""#,
    );

    let stdout = ok(xtask()
        .args(["fetch", "--models"])
        .arg(&list)
        .arg("--cache")
        .arg(&cache)
        .arg("--out")
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1"));
    assert!(stdout.contains("in the cache"), "{stdout}");
    assert!(
        stdout.contains(&format!("sha256 {sha} matches the pin")),
        "{stdout}"
    );

    let converted = out.join("mbf-test.safetensors");
    let ckpt = Checkpoint::load(&converted, None, &Device::Cpu).unwrap();
    assert_eq!(ckpt.config.input_norm, Config::mbf().input_norm);
    assert_eq!(ckpt.config.embedding_size, 512);
    assert_eq!(ckpt.metadata["mfn.source.repo"], REPO);
    assert_eq!(ckpt.metadata["mfn.source.commit"], COMMIT);
    assert_eq!(ckpt.metadata["mfn.source.sha256"], sha);
    let t: f64 = ckpt.metadata["mfn.threshold"].parse().unwrap();
    assert!((-1.0..=1.0).contains(&t), "threshold {t}");
    assert!(ckpt.metadata["mfn.threshold.source"].contains("lfw-20pairs-protocol2.bin"));

    // The converted weights are the ONNX file's, bit for bit.
    let direct = Checkpoint::load(&snapshot, Some(&Config::mbf()), &Device::Cpu).unwrap();
    assert_eq!(direct.tensors.len(), ckpt.tensors.len());
    for (name, t) in &direct.tensors {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = ckpt.tensors[name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
    }

    // A commit-hash revision finds its snapshot though no ref names it, and the cache is
    // used without touching the network (the endpoint here refuses every connection).
    let stdout = ok(xtask()
        .args([
            "fetch",
            "--repo",
            REPO,
            "--file",
            FILE,
            "--revision",
            COMMIT,
        ])
        .args([
            "--sha256",
            &sha,
            "--name",
            "by-commit",
            "--threshold",
            "0.3",
        ])
        .arg("--cache")
        .arg(&cache)
        .arg("--out")
        .arg(&out)
        .env("HF_ENDPOINT", "http://127.0.0.1:9"));
    assert!(stdout.contains("in the cache"), "{stdout}");
    let ckpt = Checkpoint::load(&out.join("by-commit.safetensors"), None, &Device::Cpu).unwrap();
    assert_eq!(ckpt.metadata["mfn.threshold"], "0.3");
}

#[test]
fn rejects_a_tampered_file() {
    let tmp = tempfile::tempdir().unwrap();
    let onnx = std::fs::read(asset(MODEL)).unwrap();
    let sha = sha256(&onnx);
    let mut tampered = onnx.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    let cache = tmp.path().join("hub");
    let snapshot = hub_cache(&cache, &tampered);
    let out = tmp.path().join("out");
    let list = models_list(tmp.path(), Some(&sha), r#", "threshold": 0.3"#);

    let stderr = fails(
        xtask()
            .args(["fetch", "--models"])
            .arg(&list)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(&out)
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert!(
        stderr.contains(&format!("but the pin is {sha}")),
        "{stderr}"
    );
    assert!(stderr.contains(&sha256(&tampered)), "{stderr}");
    assert!(stderr.contains(&snapshot.display().to_string()), "{stderr}");
    assert!(!out.join("mbf-test.safetensors").exists());
}

#[test]
fn refuses_an_unpinned_file_unless_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let onnx = std::fs::read(asset(MODEL)).unwrap();
    let cache = tmp.path().join("hub");
    hub_cache(&cache, &onnx);
    let out = tmp.path().join("out");
    let list = models_list(tmp.path(), None, r#", "threshold": 0.3"#);
    let mut cmd = xtask();
    cmd.args(["fetch", "--offline", "--models"])
        .arg(&list)
        .arg("--cache")
        .arg(&cache)
        .arg("--out")
        .arg(&out);
    let stderr = fails(&mut cmd);
    assert!(stderr.contains("has no sha256 pin"), "{stderr}");
    assert!(stderr.contains(&sha256(&onnx)), "{stderr}");
    ok(cmd.arg("--allow-unpinned"));
    assert!(out.join("mbf-test.safetensors").exists());
}

#[test]
fn offline_without_the_file_says_what_to_download_and_where() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("empty-hub");
    let list = models_list(tmp.path(), Some(&"a".repeat(64)), "");
    let stderr = fails(
        xtask()
            .args(["fetch", "--models"])
            .arg(&list)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .env("HF_HUB_OFFLINE", "1"),
    );
    let folder = cache.join("models--test-org--buffalo_s");
    for want in [
        "HF_HUB_OFFLINE".to_string(),
        format!("download https://huggingface.co/{REPO}/resolve/main/{FILE}"),
        format!(
            "put it at {}",
            folder.join("snapshots/<COMMIT>").join(FILE).display()
        ),
        folder.join("refs/main").display().to_string(),
    ] {
        assert!(stderr.contains(&want), "missing `{want}` in:\n{stderr}");
    }
}

#[test]
fn an_unreachable_hub_fails_with_the_same_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("empty-hub");
    let list = models_list(tmp.path(), Some(&"a".repeat(64)), "");
    // Nothing listens on the discard port: hf-hub's download path runs and fails at once,
    // as long as no proxy stands in between.
    let mut cmd = xtask();
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        cmd.env_remove(key).env_remove(key.to_ascii_lowercase());
    }
    let stderr = fails(
        cmd.env("NO_PROXY", "127.0.0.1")
            .args(["fetch", "--models"])
            .arg(&list)
            .arg("--cache")
            .arg(&cache)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .env("HF_ENDPOINT", "http://127.0.0.1:9"),
    );
    assert!(
        stderr.contains("downloading test-org/buffalo_s@main"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "download http://127.0.0.1:9/{REPO}/resolve/main/{FILE}"
        )),
        "{stderr}"
    );
}

#[test]
fn the_committed_models_list_parses_and_names_buffalo_s() {
    let tmp = tempfile::tempdir().unwrap();
    let stderr = fails(
        xtask()
            .args(["fetch", "--offline", "--cache"])
            .arg(tmp.path().join("hub"))
            .arg("--out")
            .arg(tmp.path().join("out")),
    );
    assert!(
        stderr.contains("immich-app/buffalo_s@main:recognition/model.onnx is not in the Hub cache"),
        "{stderr}"
    );
}
