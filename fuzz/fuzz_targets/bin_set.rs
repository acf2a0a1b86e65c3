//! The insightface `.bin` pickle reader on arbitrary bytes: it must return, never panic,
//! and whatever it accepts must survive a write and read back unchanged.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mfn_data::BinSet;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.bin");
    if let Ok(set) = BinSet::parse(data, path) {
        assert_eq!(set.images.len(), 2 * set.pairs());
        let again = BinSet::parse(&set.to_pickle(), path).expect("re-reading a written set");
        assert!(again == set, "a written set reads back differently");
    }
});
