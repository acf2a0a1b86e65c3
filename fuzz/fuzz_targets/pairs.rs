//! The LFW `pairs.txt` parser on arbitrary text: it must return, never panic, allocate
//! nothing from the header's counts beyond the lines there are, keep every image inside
//! the image folder, and show file text in errors only escaped and short.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mfn_data::Pairs;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Pairs::parse(text, Path::new("fuzz.txt")) {
        Ok(p) => {
            assert!(p.folds >= 1);
            assert_eq!(p.pairs.len() % p.folds, 0);
            let root = Path::new("/images");
            let (unique, index) = p.index();
            assert!(index.iter().flatten().all(|&i| i < unique.len()));
            for r in &unique {
                let file = r.path(root, "jpg");
                assert!(file.starts_with(root), "{} leaves the folder", file.display());
                assert_eq!(file.components().count(), 4, "{}", file.display());
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.txt"), "{msg}");
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
            assert!(msg.len() < 1000, "{} bytes of message", msg.len());
        }
    }
});
