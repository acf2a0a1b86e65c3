//! The SCRFD loader on arbitrary bytes: ONNX parsing, the graph compiled into the
//! detector's interpreter, the probe run that tells its outputs apart, and a search of a
//! small image with whatever loads. It must return, never panic, and never allocate more
//! than the input and the image can describe.

#![no_main]

use std::path::Path;

use candle_core::Device;
use image::RgbImage;
use libfuzzer_sys::fuzz_target;
use mfn_detect::scrfd::Scrfd;

fuzz_target!(|data: &[u8]| {
    let device = Device::Cpu;
    if let Ok(det) = Scrfd::load_bytes(data, Path::new("fuzz-dir/fuzz.onnx"), &device) {
        let img = RgbImage::from_pixel(64, 32, image::Rgb([200, 120, 40]));
        let _ = det.anchors(&img, 0.1);
    }
});
