//! `mfn-cli` as a fresh clone runs it: no assets folder, an empty cache, and the pinned
//! sources served by a loopback Hub (`HF_ENDPOINT`) from the shared assets. Test pins
//! (`MFN_REGISTRY`) map the shared `.bin` files to the set names the real registry pins.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{asset, read_json, stderr};
use mfn_hub::loopback::Server;
use mfn_hub::Registry;

/// The real registry's w600k_mbf entry.
fn w600k_entry() -> mfn_hub::Entry {
    Registry::builtin()
        .unwrap()
        .get("w600k_mbf")
        .unwrap()
        .clone()
}

/// A machine with nothing on it: no assets folder, an empty cache under `home`.
fn fresh(home: &Path, endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mfn-cli"));
    c.env("MFN_ASSETS", home.join("no-assets-here"))
        .env("MFN_HOME", home.join("mfn"))
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("MFN_MIRROR")
        .env_remove("MFN_REGISTRY")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME");
    c
}

fn run(mut c: Command, args: &[&str]) -> Output {
    c.args(args).output().expect("running mfn-cli")
}

fn sha(p: &Path) -> String {
    mfn_hub::sha256_file(p).unwrap()
}

/// A registry file of test pins: `set` names served from the shared `.bin` files, MTCNN's
/// nets from the shared copies (in one Hub folder, as the detector needs them), and
/// `scrfd_500m` (insightface's `det_500m`, which the assets folder lacks) served as the
/// other export of the same network that it holds.
fn test_pins(dir: &Path, sets: &[(&str, &str)]) -> PathBuf {
    let mut entries = Vec::new();
    for (name, rel) in sets {
        let f = asset(rel);
        entries.push(format!(
            r#"{{"name": "{name}", "kind": "set", "sha256": "{}", "size": {},
                "source": {{"hub": {{"repo": "mfn-test/assets", "type": "dataset",
                  "revision": "main", "path": "{rel}"}}}}}}"#,
            sha(&f),
            std::fs::metadata(&f).unwrap().len()
        ));
    }
    for net in ["pnet", "rnet", "onet"] {
        let rel = format!("models/mtcnn/{net}.pt");
        let f = asset(&rel);
        entries.push(format!(
            r#"{{"name": "mtcnn_{net}", "kind": "detector", "sha256": "{}", "size": {},
                "source": {{"hub": {{"repo": "mfn-test/assets", "revision": "main",
                  "path": "{rel}"}}}}}}"#,
            sha(&f),
            std::fs::metadata(&f).unwrap().len()
        ));
    }
    let rel = "models/scrfd-500m/scrfd_500m_bnkps.onnx";
    let f = asset(rel);
    entries.push(format!(
        r#"{{"name": "scrfd_500m", "kind": "detector", "sha256": "{}", "size": {},
            "source": {{"hub": {{"repo": "mfn-test/assets", "revision": "main",
              "path": "{rel}"}}}}}}"#,
        sha(&f),
        std::fs::metadata(&f).unwrap().len()
    ));
    let path = dir.join("test-pins.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"format": "mfn-registry/1", "entries": [{}]}}"#,
            entries.join(",\n")
        ),
    )
    .unwrap();
    path
}

/// Serves every test pin and the real w600k_mbf entry from the shared assets.
fn serve(server: &Server, pins: &Path) {
    server
        .serve_entry(&w600k_entry(), &asset("models/w600k-mbf/w600k_mbf.onnx"))
        .unwrap();
    let reg = Registry::load(pins).unwrap();
    for e in reg.entries() {
        let mfn_hub::Source::Hub(h) = &e.source else {
            unreachable!()
        };
        server.serve_entry(e, &asset(&h.path)).unwrap();
    }
}

#[test]
fn offline_with_nothing_says_what_to_set_or_download() {
    let home = tempfile::tempdir().unwrap();
    let model_url =
        "https://huggingface.co/immich-app/buffalo_s/resolve/main/recognition/model.onnx";
    let lfw_url = "https://huggingface.co/datasets/Icar/val_sets/resolve/\
                   1f7800d9d5ba295554573a4e292e870b64a49b74/lfw.bin";
    for (args, name, url) in [
        // eval reads its data before the model.
        (vec!["eval"], "`lfw`", lfw_url),
        (vec!["eval", "--bin", "x.bin"], "", ""),
        (
            // The photos are never read: the model comes first.
            vec!["verify", "--aligned", "a.png", "b.png"],
            "`w600k_mbf`",
            model_url,
        ),
    ] {
        let mut c = fresh(home.path(), "https://huggingface.co");
        c.env("HF_HUB_OFFLINE", "1");
        let o = run(c, &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        if name.is_empty() {
            // A missing file the user named is reported with its path.
            assert!(err.contains("x.bin"), "{err}");
            continue;
        }
        assert!(!err.contains("No such file"), "{args:?}: {err}");
        assert!(err.contains(name), "{err}");
        assert!(err.contains(url), "{err}");
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        assert!(
            err.contains(&home.path().join("mfn/hub").display().to_string()),
            "{err}"
        );
        assert!(err.contains("MFN_ASSETS"), "{err}");
    }
}

#[test]
fn eval_downloads_checks_converts_and_evaluates_then_works_offline() {
    let home = tempfile::tempdir().unwrap();
    let server = Server::start().unwrap();
    let pins = test_pins(home.path(), &[("lfw", "lfw/lfw-fold1.bin")]);
    serve(&server, &pins);

    let json = home.path().join("eval.json");
    let mut c = fresh(home.path(), &server.url());
    c.env("MFN_REGISTRY", &pins);
    let o = run(c, &["eval", "--json", json.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("downloading `w600k_mbf` (13.6 MB)"), "{err}");
    assert!(err.contains("downloading `lfw`"), "{err}");
    let first = read_json(&json);
    assert_eq!(first["pairs"], 600);
    assert_eq!(first["set"], "lfw");
    let acc = first["accuracy"]["exact"]["mean"].as_f64().unwrap();
    assert!(acc > 0.98, "w600k_mbf on LFW fold 1: {acc}");

    // Converted once, with the registry's threshold and the source's sha256.
    let native = std::fs::read_dir(home.path().join("mfn/models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a converted model");
    let ckpt = mfn_model::Checkpoint::load(&native, None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        ckpt.metadata.get("mfn.source.sha256"),
        Some(&w600k_entry().sha256)
    );
    let t: f64 = ckpt.metadata["mfn.threshold"].parse().unwrap();
    assert_eq!(t, w600k_entry().threshold().unwrap().cosine);

    // The same run offline, from the cache: the same scores, not one request.
    let requests = server.requests().len();
    let json2 = home.path().join("eval2.json");
    let mut c = fresh(home.path(), &server.url());
    c.env("MFN_REGISTRY", &pins).env("HF_HUB_OFFLINE", "1");
    let o = run(
        c,
        &["eval", "--sets", "lfw", "--json", json2.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.requests().len(), requests);
    let second = read_json(&json2);
    assert_eq!(first["accuracy"], second["accuracy"]);
}

#[test]
fn verify_decides_with_no_flags_through_the_loopback_hub() {
    let home = tempfile::tempdir().unwrap();
    let server = Server::start().unwrap();
    let pins = test_pins(home.path(), &[]);
    serve(&server, &pins);
    let photo = |n: u32| {
        asset(&format!(
            "lfw-raw-subset/images/Colin_Powell/Colin_Powell_{n:04}.jpg"
        ))
        .display()
        .to_string()
    };
    let other = asset("lfw-raw-subset/images/George_W_Bush/George_W_Bush_0001.jpg")
        .display()
        .to_string();
    let mut c = fresh(home.path(), &server.url());
    c.env("MFN_REGISTRY", &pins);
    let o = run(c, &["verify", &photo(1), &photo(2)]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("same person: yes"),
        "{err}"
    );
    assert!(err.contains("registry entry `w600k_mbf`"), "{err}");

    let mut c = fresh(home.path(), &server.url());
    c.env("MFN_REGISTRY", &pins).env("HF_HUB_OFFLINE", "1");
    let o = run(c, &["verify", &photo(1), &other]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn every_set_through_the_loopback_hub_then_offline() {
    let home = tempfile::tempdir().unwrap();
    let server = Server::start().unwrap();
    let small = "lfw/lfw-20pairs-protocol2.bin";
    let sets: Vec<(&str, &str)> = mfn_hub::SETS.iter().map(|s| (*s, small)).collect();
    let pins = test_pins(home.path(), &sets);
    serve(&server, &pins);
    let y1 = asset("models/mobilefacenet-y1/model-symbol.json");
    let y1 = y1.to_str().unwrap();
    let table = |offline: bool, json: &Path| {
        let mut c = fresh(home.path(), &server.url());
        c.env("MFN_REGISTRY", &pins);
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        }
        let o = run(
            c,
            &[
                "eval",
                "--model",
                y1,
                "--sets",
                "all",
                "--folds",
                "2",
                "--json",
                json.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let online = table(false, &home.path().join("a.json"));
    for name in mfn_hub::SETS {
        assert!(
            online.lines().any(|l| l.starts_with(name)),
            "no row for {name}:\n{online}"
        );
    }
    assert!(online.contains("TAR@FAR=1e-3"), "{online}");
    let requests = server.requests().len();
    let offline = table(true, &home.path().join("b.json"));
    assert_eq!(server.requests().len(), requests, "offline must not ask");
    let (a, b) = (
        read_json(&home.path().join("a.json")),
        read_json(&home.path().join("b.json")),
    );
    let sets = a["sets"].as_array().unwrap();
    assert_eq!(sets.len(), mfn_hub::SETS.len());
    for (x, y) in sets.iter().zip(b["sets"].as_array().unwrap()) {
        assert_eq!(x["set"], y["set"]);
        assert_eq!(x["accuracy"], y["accuracy"]);
        assert_eq!(x["auc"], y["auc"]);
    }
    // The rows differ only in the wall time line.
    let rows = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("wall"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(rows(&online), rows(&offline));
}
