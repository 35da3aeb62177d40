//! Decode coverage on the odd files of the real web, against reference decoders: the TIFF
//! variants in tests/data/tiff (planar, tiled, BigTIFF, YCbCr-JPEG, CIELab, 12-bit, ...) made by
//! `scripts/make-tiff-variants.py` with libtiff's tiffcp, PIL and tifffile; `reference.json` holds
//! the size and mean RGB each reference decoder gives.

use recap::config::{ImageConfig, ImageFormat, ResizeMode};

#[test]
fn tiff_variants_decode_as_the_reference_decoders_read_them() {
    let dir = std::path::Path::new("tests/data/tiff");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let cfg = ImageConfig { resize: ResizeMode::None, min_size: 1, format: ImageFormat::Png, ..Default::default() };
    // Every variant is the same picture: base.png, pixel by pixel (lossy ones within a bound).
    let base = image::open(dir.join("base.png")).unwrap().to_rgb8();
    let mut failures = Vec::new();
    for (name, want) in reference.as_object().unwrap() {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let p = match recap::imaging::process(&bytes, &cfg) {
            Ok(p) => p,
            Err(r) => {
                failures.push(format!("{name}: {:?} {}", r.status, r.reason));
                continue;
            }
        };
        let img = image::load_from_memory(&p.image.bytes).unwrap().to_rgb8();
        assert_eq!((img.width() as u64, img.height() as u64), (want["width"].as_u64().unwrap(), want["height"].as_u64().unwrap()), "{name}");
        let n = (img.width() * img.height()) as f64;
        let mut mean = [0.0f64; 3];
        for px in img.pixels() {
            for c in 0..3 {
                mean[c] += px.0[c] as f64 / n;
            }
        }
        let mae = img.as_raw().iter().zip(base.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / base.as_raw().len() as f64;
        let bound = if name.contains("jpeg") { 3.0 } else if name.starts_with("lab") { 1.5 } else { 0.0 };
        if mae > bound {
            failures.push(format!("{name}: mean absolute difference from base.png {mae:.3} > {bound}"));
        }
        // CIELab goes through a colour-space round trip (PIL's RGB -> Lab quantised to bytes).
        let tol = if name.starts_with("lab") { 2.5 } else { 1.0 };
        for c in 0..3 {
            let r = want["mean_rgb"][c].as_f64().unwrap();
            if (mean[c] - r).abs() > tol {
                failures.push(format!("{name}: channel {c} mean {:.2}, reference {r:.2} ({})", mean[c], want["reference"]));
            }
        }
    }
    assert!(failures.is_empty(), "TIFF variants not read as the references read them:\n{}", failures.join("\n"));
}

/// Cut or damaged, each variant is a `decode_failed` row with a reason, never a panic.
#[test]
fn damaged_tiff_variants_fail_cleanly() {
    let dir = std::path::Path::new("tests/data/tiff");
    let cfg = ImageConfig { resize: ResizeMode::None, min_size: 1, format: ImageFormat::Png, ..Default::default() };
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "tif") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() / 10, bytes.len() / 2] {
            match recap::imaging::process(&bytes[..cut], &cfg) {
                Err(r) => {
                    assert_eq!(r.status, recap::outcome::Status::DecodeFailed, "{} cut at {cut}: {}", path.display(), r.reason);
                    assert!(!r.reason.is_empty());
                }
                Ok(_) => panic!("{} cut at {cut} of {} bytes decoded", path.display(), bytes.len()),
            }
        }
        // Garbage over the IFD and data: any outcome but a panic (the call returning is the check).
        let mut bad = bytes.clone();
        for (i, b) in bad.iter_mut().enumerate().skip(8) {
            *b ^= (i * 31 % 251) as u8;
        }
        let _ = recap::imaging::process(&bad, &cfg);
    }
}
