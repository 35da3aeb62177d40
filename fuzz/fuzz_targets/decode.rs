//! Any bytes as a downloaded image: decode, checks, resize, encode and hash under three
//! configurations; a `Refused` or an image, never a panic, and never more than max_pixels.
#![no_main]
use libfuzzer_sys::fuzz_target;
use recap::config::{ImageConfig, ImageFormat, ResizeMode};

fuzz_target!(|data: &[u8]| {
    let cfgs = [
        ImageConfig { size: 64, min_size: 1, max_pixels: 4_000_000, ..Default::default() },
        ImageConfig { size: 32, min_size: 1, resize: ResizeMode::KeepRatio, format: ImageFormat::Png, reduced_decode: false, max_pixels: 4_000_000, ..Default::default() },
        ImageConfig { size: 48, min_size: 1, resize: ResizeMode::Border, format: ImageFormat::Webp, max_pixels: 4_000_000, ..Default::default() },
    ];
    for cfg in &cfgs {
        if let Ok(p) = recap::imaging::process(data, cfg) {
            assert!(p.original_width as u64 * p.original_height as u64 <= cfg.max_pixels);
        }
    }
});
