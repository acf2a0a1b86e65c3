//! The MXNet symbol reader on arbitrary bytes, and the match of what it parses against
//! the y1 config: it must return, never panic, and never allocate more than the input can
//! describe.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mfn_model::import::mxnet;
use mfn_model::Config;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz-symbol.json");
    if let Ok(symbol) = mxnet::parse_symbol(data, path) {
        let _ = mxnet::match_config(&symbol, &Config::y1(), path);
    }
});
