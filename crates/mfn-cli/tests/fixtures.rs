//! The reference outputs committed under `fixtures/`: each matches its line in
//! `fixtures/SHA256SUMS`, nothing there is unlisted, every face the references name is
//! there, and each equals the assets folder's copy when `MFN_ASSETS` holds one.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// `(sha256, path)` per line of `SHA256SUMS`, paths relative to `fixtures/`.
fn sums() -> Vec<(String, String)> {
    let path = root().join("SHA256SUMS");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let (hash, rel) = l
                .split_once("  ")
                .unwrap_or_else(|| panic!("SHA256SUMS: not `<sha256>  <path>`: {l:?}"));
            (hash.to_string(), rel.trim_start_matches("./").to_string())
        })
        .collect()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn every_fixture_matches_its_sha256() {
    let sums = sums();
    assert!(!sums.is_empty());
    for (hash, rel) in &sums {
        let actual = mfn_hub::sha256_file(&root().join(rel)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&actual, hash, "fixtures/{rel}");
    }
}

#[test]
fn every_fixture_is_listed() {
    let listed: Vec<String> = sums().into_iter().map(|(_, rel)| rel).collect();
    let mut files = Vec::new();
    files_under(&root(), &mut files);
    for f in files {
        let rel = f
            .strip_prefix(root())
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        if rel == "README.md" || rel == "SHA256SUMS" {
            continue;
        }
        assert!(listed.contains(&rel), "fixtures/{rel} is not in SHA256SUMS");
    }
}

#[test]
fn fixtures_equal_the_assets_folder_copies_it_holds() {
    let Some(assets) = std::env::var_os("MFN_ASSETS").map(PathBuf::from) else {
        return;
    };
    for (_, rel) in sums() {
        let theirs = assets.join(&rel);
        if theirs.is_file() {
            assert!(
                std::fs::read(root().join(&rel)).unwrap() == std::fs::read(&theirs).unwrap(),
                "fixtures/{rel} differs from {}",
                theirs.display()
            );
        }
    }
}
