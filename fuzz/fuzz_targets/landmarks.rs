//! The landmarks-file parser on arbitrary text: it must return, never panic; every face it
//! accepts has ten finite coordinates, and errors show file text only escaped and short.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mfn_data::align::parse_landmarks;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_landmarks(text, Path::new("fuzz.txt")) {
        Ok(faces) => {
            for (path, points) in faces {
                assert!(!path.as_os_str().is_empty());
                assert!(points.iter().flatten().all(|v| v.is_finite()));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.txt:"), "{msg}");
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
            assert!(msg.len() < 1000, "{} bytes of message", msg.len());
        }
    }
});
