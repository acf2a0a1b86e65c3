//! Image decoding as the project does it (`mfn_data::decode_rgb_bytes`: format sniffing,
//! the truncated-JPEG check, the size and memory limits, conversion to RGB) on arbitrary
//! bytes: it must return, never panic, never decode past the limits, and name the image in
//! every error.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mfn_data::image::{MAX_IMAGE_BYTES, MAX_IMAGE_SIDE};

fuzz_target!(|data: &[u8]| {
    match mfn_data::decode_rgb_bytes(data, Path::new("fuzz.img")) {
        Ok(img) => {
            let (w, h) = img.dimensions();
            assert!(w <= MAX_IMAGE_SIDE && h <= MAX_IMAGE_SIDE, "{w}x{h}");
            assert!(u64::from(w) * u64::from(h) * 3 <= MAX_IMAGE_BYTES, "{w}x{h}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.img: "), "{msg}");
            assert!(!msg.chars().any(char::is_control), "{msg:?}");
        }
    }
});
