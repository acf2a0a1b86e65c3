//! `cargo xtask fetch` against a loopback server in the Hub's URL layout, with a test
//! registry (`MFN_REGISTRY`) that pins the `mbf` export of the assets as a Hub file: the
//! download is checked and converted, a second run offline answers from the cache, other
//! bytes are refused naming both sha256s, and offline without a cache the error names the
//! URL and the cache path.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use common::{asset, assets, fails, ok, xtask};
use mfn_hub::loopback::{Server, COMMIT};
use mfn_hub::pretrained::SOURCE_SHA256_KEY;
use mfn_hub::Registry;
use mfn_model::{Checkpoint, Config};

const MODEL: &str = "models/mbf-onnx-export/mbf-random-weights.onnx";
const NAME: &str = "mbf-test";
const REPO: &str = "mfn-test/models";
const FILE: &str = "recognition/model.onnx";
const THRESHOLD: &str = "0.3125";

fn sha(path: &Path) -> String {
    mfn_hub::sha256_file(path).unwrap()
}

/// A test setting: a registry file with one model entry pinned to the `mbf` export, an
/// empty assets folder and an empty `MFN_HOME`.
struct Setup {
    dir: tempfile::TempDir,
    registry: PathBuf,
    sha256: String,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = asset(MODEL);
        let sha256 = sha(&model);
        let registry = dir.path().join("registry.json");
        std::fs::write(
            &registry,
            format!(
                r#"{{"format": "mfn-registry/1", "entries": [{{
                    "name": "{NAME}", "kind": "model", "sha256": "{sha256}",
                    "size": {size}, "assets": "{MODEL}",
                    "source": {{"hub": {{"repo": "{REPO}", "revision": "main", "path": "{FILE}"}}}},
                    "model": {{"preset": "mbf", "threshold": {{"cosine": {THRESHOLD},
                        "derivation": "a test pin"}}}}}}]}}"#,
                size = std::fs::metadata(&model).unwrap().len()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("empty-assets")).unwrap();
        Self {
            dir,
            registry,
            sha256,
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `cargo xtask fetch` with the test registry, the empty assets folder, the temporary
    /// `MFN_HOME`, and the Hub at `endpoint`.
    fn fetch(&self, endpoint: &str) -> Command {
        let mut c = xtask();
        c.arg("fetch")
            .env("MFN_REGISTRY", &self.registry)
            .env("MFN_ASSETS", self.dir.path().join("empty-assets"))
            .env("MFN_HOME", self.home())
            .env("HF_ENDPOINT", endpoint);
        c
    }

    fn entry(&self) -> mfn_hub::Entry {
        Registry::load(&self.registry)
            .unwrap()
            .get(NAME)
            .unwrap()
            .clone()
    }

    fn converted(&self) -> PathBuf {
        self.home()
            .join("models")
            .join(format!("{NAME}-{}.safetensors", &self.sha256[..12]))
    }

    /// Where the Hub cache keeps the file after a download from the loopback server.
    fn snapshot(&self) -> PathBuf {
        self.home()
            .join("hub/models--mfn-test--models/snapshots")
            .join(COMMIT)
            .join(FILE)
    }
}

#[test]
fn downloads_checks_and_converts_then_answers_offline_from_the_cache() {
    let s = Setup::new();
    let server = Server::start().unwrap();
    server.serve_entry(&s.entry(), &asset(MODEL)).unwrap();

    let stdout = ok(s.fetch(&server.url()).arg(NAME));
    let converted = s.converted();
    assert!(
        stdout.contains(&format!(
            "{NAME}: {} (converted from {}, download)",
            converted.display(),
            s.snapshot().display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("threshold {THRESHOLD}")),
        "{stdout}"
    );
    assert!(
        server.requests().iter().any(|p| p.ends_with(FILE)),
        "{:?}",
        server.requests()
    );
    assert_eq!(sha(&s.snapshot()), s.sha256);

    let ckpt = Checkpoint::load(&converted, None, &Device::Cpu).unwrap();
    assert_eq!(ckpt.metadata["mfn.threshold"], THRESHOLD);
    assert_eq!(ckpt.metadata[SOURCE_SHA256_KEY], s.sha256);
    assert_eq!(ckpt.config.input_norm, Config::mbf().input_norm);
    assert_eq!(ckpt.config.embedding_size, 512);
    // The converted weights are the ONNX file's, bit for bit.
    let direct = Checkpoint::load(&asset(MODEL), Some(&Config::mbf()), &Device::Cpu).unwrap();
    assert_eq!(direct.tensors.len(), ckpt.tensors.len());
    for (name, t) in &direct.tensors {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = ckpt.tensors[name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
    }

    // Offline, the cache answers, and the converted file is reused: no request at all.
    let before = server.requests().len();
    let stdout = ok(s.fetch(&server.url()).args(["--offline", NAME]));
    assert!(
        stdout.contains(&format!(
            "{NAME}: {} (converted earlier from {}, cache)",
            converted.display(),
            s.snapshot().display()
        )),
        "{stdout}"
    );
    assert_eq!(server.requests().len(), before, "offline means no request");

    // `--list` shows the entry with its size, pin, source and what is on disk.
    let stdout = ok(s.fetch(&server.url()).args(["--list", "--kind", "model"]));
    let row = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{NAME} ")))
        .unwrap_or_else(|| panic!("no {NAME} row in:\n{stdout}"));
    for want in [
        "model".to_string(),
        s.sha256[..12].to_string(),
        "cache,converted".to_string(),
        format!("{}/{REPO}/resolve/main/{FILE}", server.url()),
    ] {
        assert!(row.contains(&want), "missing `{want}` in `{row}`");
    }
    assert!(
        stdout.lines().any(|l| l.starts_with("w600k_mbf ")),
        "{stdout}"
    );
    assert!(!stdout.lines().any(|l| l.starts_with("lfw ")), "{stdout}");
}

#[test]
fn a_server_serving_other_bytes_is_refused_naming_both_sha256s() {
    let s = Setup::new();
    let server = Server::start().unwrap();
    // The same size, one bit flipped: only the hash can tell.
    let mut bytes = std::fs::read(asset(MODEL)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let tampered = s.dir.path().join("tampered.onnx");
    std::fs::write(&tampered, &bytes).unwrap();
    server.serve_entry(&s.entry(), &tampered).unwrap();

    let stderr = fails(s.fetch(&server.url()).arg(NAME));
    assert!(stderr.contains(&s.sha256), "{stderr}");
    assert!(stderr.contains(&sha(&tampered)), "{stderr}");
    assert!(stderr.contains(&format!("`{NAME}`")), "{stderr}");
    assert!(
        !s.snapshot().exists(),
        "the bad file must not stay in the cache"
    );
    assert!(!s.converted().exists());
}

#[test]
fn offline_with_an_empty_cache_names_the_url_and_the_cache_path() {
    let s = Setup::new();
    let server = Server::start().unwrap();
    server.serve_entry(&s.entry(), &asset(MODEL)).unwrap();
    let url = format!("{}/{REPO}/resolve/main/{FILE}", server.url());
    // Nothing downloaded yet, so the cache path is the revision's snapshot folder.
    let cache_path = s
        .home()
        .join("hub/models--mfn-test--models/snapshots/main")
        .join(FILE);
    for flag in [true, false] {
        let mut cmd = s.fetch(&server.url());
        if flag {
            cmd.arg("--offline");
        } else {
            cmd.env("HF_HUB_OFFLINE", "1");
        }
        let stderr = fails(cmd.arg(NAME));
        assert!(stderr.contains(&url), "missing {url} in:\n{stderr}");
        assert!(
            stderr.contains(&cache_path.display().to_string()),
            "missing {} in:\n{stderr}",
            cache_path.display()
        );
        assert!(stderr.contains("downloads are off"), "{stderr}");
    }
    assert_eq!(server.served(), 0, "offline means no request");
    assert!(!s.converted().exists());
}

#[test]
fn by_default_fetches_the_default_model_and_lfw() {
    // Offline with nothing on disk, both defaults fail, each named: that is the selection.
    let s = Setup::new();
    let stderr = fails(s.fetch("http://127.0.0.1:9").arg("--offline"));
    assert!(stderr.contains("2 of 2 entries"), "{stderr}");
    for name in [mfn_hub::DEFAULT_MODEL, "lfw"] {
        assert!(stderr.contains(&format!("`{name}`")), "{stderr}");
    }
}

#[test]
fn other_kinds_resolve_from_the_assets_folder_with_their_origin() {
    let s = Setup::new();
    let stdout = ok(s
        .fetch("http://127.0.0.1:9")
        .env("MFN_ASSETS", assets())
        .args(["--offline", "--kind", "file", "lfw_pairs"]));
    assert_eq!(
        stdout.trim(),
        format!("lfw_pairs: {} (assets)", asset("lfw/pairs.txt").display())
    );

    let stderr = fails(
        s.fetch("http://127.0.0.1:9")
            .args(["--kind", "model", "lfw"]),
    );
    assert!(stderr.contains("`lfw` is a set, not a model"), "{stderr}");
    let stderr = fails(s.fetch("http://127.0.0.1:9").arg("no-such-entry"));
    assert!(stderr.contains("no-such-entry"), "{stderr}");
    assert!(
        stderr.contains(NAME),
        "the known names are listed: {stderr}"
    );
}
