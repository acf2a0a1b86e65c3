//! The download path end to end against a loopback server that serves the shared assets
//! in the Hub's URL layout: download, sha256 check, cache layout, offline reuse, tampered
//! files, dropped connections, URL and wheel-member sources through a mirror.

use std::io::Write;
use std::path::{Path, PathBuf};

use mfn_hub::loopback::{route_path, Server, COMMIT};
use mfn_hub::{Error, Origin, Registry, Resolver};

fn assets() -> PathBuf {
    let root = std::env::var_os("MFN_ASSETS")
        .map(PathBuf::from)
        .expect("MFN_ASSETS must name the assets folder these tests serve");
    assert!(
        root.is_dir(),
        "MFN_ASSETS={} is not a folder",
        root.display()
    );
    root
}

fn sha(path: &Path) -> String {
    mfn_hub::sha256_file(path).unwrap()
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// A registry of one entry for `file`, at `source` (JSON of a `source` object).
fn registry_for(name: &str, kind: &str, file: &Path, source: &str) -> Registry {
    Registry::parse(
        &format!(
            r#"{{"format": "mfn-registry/1", "entries": [{{"name": "{name}", "kind": "{kind}",
                "sha256": "{}", "size": {}, "assets": "lfw/lfw-fold1.bin", "source": {source}}}]}}"#,
            sha(file),
            size(file)
        ),
        "test",
    )
    .unwrap()
}

fn hub_source(path: &str) -> String {
    format!(
        r#"{{"hub": {{"repo": "mfn-test/assets", "type": "dataset", "revision": "main", "path": "{path}"}}}}"#
    )
}

fn resolver(server: &Server, dir: &Path) -> Resolver {
    Resolver {
        assets: None,
        assets_note: None,
        hub_cache: dir.join("hub"),
        cache: dir.join("mfn"),
        endpoint: server.url(),
        mirror: None,
        offline: None,
        progress: false,
    }
}

fn fold1() -> PathBuf {
    assets().join("lfw/lfw-fold1.bin")
}

#[test]
fn downloads_into_the_hub_cache_then_reuses_it_offline() {
    let server = Server::start().unwrap();
    let reg = registry_for("lfw", "set", &fold1(), &hub_source("lfw/lfw-fold1.bin"));
    let entry = reg.get("lfw").unwrap();
    server.serve_entry(entry, &fold1()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = resolver(&server, dir.path());

    let got = r.resolve(entry).unwrap();
    assert_eq!(got.origin, Origin::Download);
    // The layout huggingface_hub and hf-hub share.
    let expected = dir
        .path()
        .join("hub/datasets--mfn-test--assets/snapshots")
        .join(COMMIT)
        .join("lfw/lfw-fold1.bin");
    assert_eq!(got.path, expected);
    assert_eq!(sha(&got.path), entry.sha256);
    let blob = dir
        .path()
        .join("hub/datasets--mfn-test--assets/blobs")
        .join(&entry.sha256);
    assert!(blob.is_file(), "{} is missing", blob.display());
    let refs = dir.path().join("hub/datasets--mfn-test--assets/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap().trim(), COMMIT);

    let before = server.requests().len();
    let offline = Resolver {
        offline: Some("HF_HUB_OFFLINE is set".into()),
        ..r.clone()
    };
    let again = offline.resolve(entry).unwrap();
    assert_eq!(again.origin, Origin::Cache);
    assert_eq!(again.path, expected);
    let online_again = r.resolve(entry).unwrap();
    assert_eq!(online_again.origin, Origin::Cache);
    assert_eq!(server.requests().len(), before, "the cache must answer");
}

#[test]
fn offline_without_a_cache_names_the_file_its_url_and_the_cache() {
    let server = Server::start().unwrap();
    let reg = registry_for("lfw", "set", &fold1(), &hub_source("lfw/lfw-fold1.bin"));
    let entry = reg.get("lfw").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = Resolver {
        offline: Some("HF_HUB_OFFLINE is set".into()),
        ..resolver(&server, dir.path())
    };
    let err = r.resolve(entry).unwrap_err();
    assert!(matches!(err, Error::Offline { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("`lfw`"), "{msg}");
    assert!(
        msg.contains(&format!(
            "{}/datasets/mfn-test/assets/resolve/main/lfw/lfw-fold1.bin",
            server.url()
        )),
        "{msg}"
    );
    assert!(
        msg.contains(&dir.path().join("hub").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("MFN_ASSETS"), "{msg}");
    assert_eq!(server.served(), 0, "offline means no request");
}

#[test]
fn a_tampered_download_is_rejected_naming_both_hashes_and_not_kept() {
    let server = Server::start().unwrap();
    let reg = registry_for("lfw", "set", &fold1(), &hub_source("lfw/lfw-fold1.bin"));
    let entry = reg.get("lfw").unwrap();
    // Another file where the pinned one should be.
    let other = assets().join("lfw/lfw-20pairs-protocol2.bin");
    server.serve_entry(entry, &other).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = resolver(&server, dir.path());
    let err = r.resolve(entry).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Mismatch { .. }), "{msg}");
    assert!(msg.contains(&entry.sha256), "{msg}");
    assert!(msg.contains(&sha(&other)), "{msg}");
    let snapshot = dir
        .path()
        .join("hub/datasets--mfn-test--assets/snapshots")
        .join(COMMIT)
        .join("lfw/lfw-fold1.bin");
    assert!(
        !snapshot.exists(),
        "the bad file must not stay in the cache"
    );
    // Once the right file is served, the same cache recovers.
    server.serve_entry(entry, &fold1()).unwrap();
    assert_eq!(r.resolve(entry).unwrap().origin, Origin::Download);
}

#[test]
fn a_tampered_cached_copy_is_rejected() {
    let server = Server::start().unwrap();
    let reg = registry_for("lfw", "set", &fold1(), &hub_source("lfw/lfw-fold1.bin"));
    let entry = reg.get("lfw").unwrap();
    server.serve_entry(entry, &fold1()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = resolver(&server, dir.path());
    let path = r.resolve(entry).unwrap().path;
    let blob = std::fs::canonicalize(&path).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&blob)
        .unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    let msg = r.resolve(entry).unwrap_err().to_string();
    assert!(msg.contains("the cached copy"), "{msg}");
    assert!(msg.contains(&entry.sha256), "{msg}");
    assert!(msg.contains("delete"), "{msg}");
}

#[test]
fn a_dropped_connection_resumes_and_the_file_checks_out() {
    let server = Server::start().unwrap();
    let reg = registry_for("lfw", "set", &fold1(), &hub_source("lfw/lfw-fold1.bin"));
    let entry = reg.get("lfw").unwrap();
    server.serve_entry(entry, &fold1()).unwrap();
    let route = route_path(entry);
    server.cut_next(&route, 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let r = resolver(&server, dir.path());
    let got = r.resolve(entry).unwrap();
    assert_eq!(sha(&got.path), entry.sha256);
    let gets = server.requests().iter().filter(|p| **p == route).count();
    // The metadata probe, the cut-off body, and the resumed rest.
    assert!(gets >= 3, "{gets} requests for {route}");
}

#[test]
fn url_sources_and_wheel_members_come_through_a_mirror() {
    let server = Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pairs = assets().join("lfw/pairs.txt");
    // A wheel is a zip archive; pack the pairs file into one, deflated.
    let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        z.start_file("pkg/data/pairs.txt", opts).unwrap();
        z.write_all(&std::fs::read(&pairs).unwrap()).unwrap();
        z.finish().unwrap();
    }
    let reg = Registry::parse(
        &format!(
            r#"{{"format": "mfn-registry/1", "entries": [
              {{"name": "plain", "kind": "file", "sha256": "{s}", "size": {n},
                "source": {{"url": {{"url": "https://example.org/lfw/pairs.txt"}}}}}},
              {{"name": "member", "kind": "file", "sha256": "{s}", "size": {n},
                "source": {{"url": {{"url": "https://files.example.org/p/pkg-1.0-py3-none-any.whl",
                  "member": "pkg/data/pairs.txt", "archive_sha256": "{ws}", "archive_size": {wn}}}}}}}]}}"#,
            s = sha(&pairs),
            n = size(&pairs),
            ws = sha(&wheel),
            wn = size(&wheel),
        ),
        "test",
    )
    .unwrap();
    server
        .route("/urls/example.org/lfw/pairs.txt", &pairs)
        .unwrap();
    server
        .route("/urls/files.example.org/p/pkg-1.0-py3-none-any.whl", &wheel)
        .unwrap();
    let r = Resolver {
        mirror: Some(server.url()),
        endpoint: "http://127.0.0.1:9".into(),
        ..resolver(&server, &dir.path().join("cache"))
    };
    for name in ["plain", "member"] {
        let e = reg.get(name).unwrap();
        let got = r.resolve(e).unwrap();
        assert_eq!(got.origin, Origin::Download, "{name}");
        assert_eq!(sha(&got.path), e.sha256, "{name}");
        assert_eq!(r.resolve(e).unwrap().origin, Origin::Cache, "{name}");
    }
    // Nothing but the finished files in the cache: no temporary files left behind.
    let leftovers: Vec<_> = walk(&dir.path().join("cache"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A mirror serving another file: refused, and nothing kept.
    let fresh = dir.path().join("cache2");
    server
        .route("/urls/example.org/lfw/pairs.txt", &fold1())
        .unwrap();
    let r2 = Resolver {
        mirror: Some(server.url()),
        ..resolver(&server, &fresh)
    };
    let msg = r2
        .resolve(reg.get("plain").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("more than the pinned") || msg.contains("sha256"),
        "{msg}"
    );
    assert!(
        walk(&fresh).iter().all(|p| !p.is_file()),
        "{:?}",
        walk(&fresh)
    );
}

#[test]
fn the_assets_folder_answers_first_and_is_checked_too() {
    let server = Server::start().unwrap();
    let reg = registry_for("lfw", "set", &fold1(), &hub_source("lfw/lfw-fold1.bin"));
    let entry = reg.get("lfw").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = Resolver {
        assets: Some(assets()),
        ..resolver(&server, dir.path())
    };
    let got = r.resolve(entry).unwrap();
    assert_eq!(got.origin, Origin::Assets);
    assert_eq!(got.path, fold1());
    assert_eq!(server.served(), 0);

    // An entry pinned to other content than the assets file holds.
    let other = registry_for(
        "lfw",
        "set",
        &assets().join("lfw/pairs.txt"),
        &hub_source("lfw/lfw-fold1.bin"),
    );
    let msg = r
        .resolve(other.get("lfw").unwrap())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("the assets copy"), "{msg}");
    assert!(msg.contains(&sha(&fold1())), "{msg}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn assets_layout_paths_go_through_the_registry_where_it_pins_them() {
    let server = Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with_assets = mfn_hub::Hub {
        registry: Registry::builtin().unwrap(),
        resolver: Resolver {
            assets: Some(assets()),
            ..resolver(&server, dir.path())
        },
    };
    assert_eq!(
        with_assets.asset("models/mtcnn/pnet.pt").unwrap(),
        assets().join("models/mtcnn/pnet.pt")
    );
    assert_eq!(
        with_assets.asset_dir("models/mtcnn").unwrap(),
        assets().join("models/mtcnn")
    );
    // Not in the registry: straight from the assets folder.
    assert_eq!(
        with_assets.asset("lfw/lfw-fold1.bin").unwrap(),
        assets().join("lfw/lfw-fold1.bin")
    );
    assert_eq!(server.served(), 0);

    // No assets folder, no network: a pinned file names its URL, an unpinned one says it
    // has no public source.
    let bare = mfn_hub::Hub {
        registry: Registry::builtin().unwrap(),
        resolver: Resolver {
            offline: Some("HF_HUB_OFFLINE is set".into()),
            assets_note: Some("MFN_ASSETS is not set".into()),
            ..resolver(&server, dir.path())
        },
    };
    let err = bare.asset("models/mtcnn/pnet.pt").unwrap_err().to_string();
    assert!(err.contains("facenet_pytorch-2.6.0"), "{err}");
    let err = bare.asset("lfw/lfw-fold1.bin").unwrap_err().to_string();
    assert!(err.contains("no public source"), "{err}");
    assert!(err.contains("MFN_ASSETS"), "{err}");
}

#[test]
fn a_folder_of_pinned_files_downloads_into_one_tree() {
    let server = Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::builtin().unwrap();
    let photos: Vec<_> = registry.under_assets("lfw-raw-subset/images").collect();
    assert_eq!(photos.len(), 100);
    for e in &photos {
        server
            .serve_entry(e, &assets().join(e.assets.as_deref().unwrap()))
            .unwrap();
    }
    let hub = mfn_hub::Hub {
        registry: registry.clone(),
        resolver: Resolver {
            mirror: Some(server.url()),
            ..resolver(&server, dir.path())
        },
    };
    let root = hub.asset_dir("lfw-raw-subset/images").unwrap();
    assert!(root.starts_with(dir.path()), "{}", root.display());
    let one = root.join("Colin_Powell/Colin_Powell_0001.jpg");
    assert_eq!(
        sha(&one),
        sha(&assets().join("lfw-raw-subset/images/Colin_Powell/Colin_Powell_0001.jpg"))
    );
    let with_assets = mfn_hub::Hub {
        registry,
        resolver: Resolver {
            assets: Some(assets()),
            ..resolver(&server, dir.path())
        },
    };
    assert_eq!(
        with_assets.asset_dir("lfw-raw-subset/images").unwrap(),
        assets().join("lfw-raw-subset/images")
    );
}
