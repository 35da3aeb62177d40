//! The augmentation replay: the views of an image the teachers saw, drawn from a seed and stored
//! as parameters, so the trainer can rebuild exactly the same view later (MobileCLIP's
//! DataCompDR stores them the same way). One function, [`render`], makes a view from parameters;
//! [`draw`] makes parameters from a seed.
//!
//! A view: a random resized crop (torchvision's `RandomResizedCrop`: area 8-100%, aspect 3/4-4/3),
//! a horizontal flip with probability 1/2, then RandAugment: `ops` operations drawn from the 14
//! of DataCompDR at magnitude `magnitude` of 31 bins, each geometric or enhancing one with a
//! random sign, as torchvision's `RandAugment` does.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::model::ResizeFilter;
use crate::imaging::resize_rgb;

/// Bumped whenever [`render`] or [`draw`] would give different pixels or parameters.
pub const SPEC_VERSION: &str = "recap-augment-1";

pub const OPS: [&str; 14] = [
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness",
    "Posterize", "Solarize", "AutoContrast", "Equalize",
];

/// One RandAugment operation with the value it applies (sign included): shear factor, translation
/// as a fraction of the side, degrees, enhancement delta, posterize bits, solarize threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub op: String,
    pub value: f32,
}

/// Everything needed to rebuild a view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewParams {
    /// Crop box in the source image's pixels.
    pub crop_x: u32,
    pub crop_y: u32,
    pub crop_w: u32,
    pub crop_h: u32,
    pub flip: bool,
    pub ops: Vec<Op>,
}

impl ViewParams {
    /// The whole image, untouched: the original view.
    pub fn identity(w: u32, h: u32) -> ViewParams {
        ViewParams { crop_x: 0, crop_y: 0, crop_w: w, crop_h: h, flip: false, ops: Vec::new() }
    }
}

/// How views are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentSpec {
    pub min_scale: f64,
    pub max_scale: f64,
    pub ops: usize,
    /// Magnitude bin, 0..=30.
    pub magnitude: u32,
}

impl Default for AugmentSpec {
    fn default() -> Self {
        AugmentSpec { min_scale: 0.08, max_scale: 1.0, ops: 2, magnitude: 9 }
    }
}

/// A sample's uid (32 hex digits) as a number; any other text is folded in (FNV-1a), still
/// deterministic. Every per-sample generator of the model stages starts from this.
pub fn uid_bits(uid: &str) -> u128 {
    u128::from_str_radix(uid.get(..32).unwrap_or(uid), 16)
        .unwrap_or_else(|_| uid.bytes().fold(0xcbf29ce484222325u128, |a, b| (a ^ b as u128).wrapping_mul(0x100000001b3)))
}

/// A generator for view `view` of the sample whose uid is `uid` (hex), under a run seed.
pub fn rng_for(uid: &str, view: u32, seed: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    let h = uid_bits(uid);
    key[..16].copy_from_slice(&h.to_le_bytes());
    key[16..24].copy_from_slice(&seed.to_le_bytes());
    key[24..28].copy_from_slice(&view.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

const BINS: f32 = 31.0;

/// The value an op applies at magnitude bin `m` (before the sign), as torchvision's RandAugment.
fn level(op: &str, m: u32) -> f32 {
    let t = m as f32 / (BINS - 1.0);
    match op {
        "ShearX" | "ShearY" => 0.3 * t,
        "TranslateX" | "TranslateY" => 150.0 / 331.0 * t,
        "Rotate" => 30.0 * t,
        "Brightness" | "Color" | "Contrast" | "Sharpness" => 0.9 * t,
        "Posterize" => 8.0 - (m as f32 / ((BINS - 1.0) / 4.0)).round(),
        "Solarize" => 255.0 * (1.0 - t),
        _ => 0.0,
    }
}

fn signed(op: &str) -> bool {
    matches!(op, "ShearX" | "ShearY" | "TranslateX" | "TranslateY" | "Rotate" | "Brightness" | "Color" | "Contrast" | "Sharpness")
}

/// Draw a view's parameters for a `w`×`h` source.
pub fn draw(rng: &mut ChaCha8Rng, w: u32, h: u32, spec: &AugmentSpec) -> ViewParams {
    let area = (w as f64) * (h as f64);
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    let mut crop = None;
    for _ in 0..10 {
        let target = area * rng.random_range(spec.min_scale..=spec.max_scale);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ratio).sqrt().round() as u32;
        let ch = (target / ratio).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            crop = Some((x, y, cw, ch));
            break;
        }
    }
    // torchvision's fallback: a center crop within the aspect range.
    let (x, y, cw, ch) = crop.unwrap_or_else(|| {
        let r = w as f64 / h as f64;
        let (cw, ch) = if r < 3.0 / 4.0 {
            (w, ((w as f64) / (3.0 / 4.0)).round() as u32)
        } else if r > 4.0 / 3.0 {
            (((h as f64) * (4.0 / 3.0)).round() as u32, h)
        } else {
            (w, h)
        };
        let (cw, ch) = (cw.clamp(1, w), ch.clamp(1, h));
        ((w - cw) / 2, (h - ch) / 2, cw, ch)
    });
    let flip = rng.random_bool(0.5);
    let ops = (0..spec.ops)
        .map(|_| {
            let name = OPS[rng.random_range(0..OPS.len())];
            let mut value = level(name, spec.magnitude);
            if signed(name) && rng.random_bool(0.5) {
                value = -value;
            }
            Op { op: name.to_string(), value }
        })
        .collect();
    ViewParams { crop_x: x, crop_y: y, crop_w: cw, crop_h: ch, flip, ops }
}

/// Make the view: crop, resize to `size`×`size`, flip, then the ops in order.
pub fn render(src: &RgbImage, p: &ViewParams, size: u32) -> Result<RgbImage, String> {
    let (w, h) = src.dimensions();
    if p.crop_w == 0 || p.crop_h == 0 || p.crop_x + p.crop_w > w || p.crop_y + p.crop_h > h {
        return Err(format!("crop {}x{}+{}+{} does not fit a {w}x{h} image", p.crop_w, p.crop_h, p.crop_x, p.crop_y));
    }
    let crop = (p.crop_x as f64, p.crop_y as f64, p.crop_w as f64, p.crop_h as f64);
    let mut img = resize_rgb(src, size, size, Some(crop), ResizeFilter::Bilinear)?;
    if p.flip {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    for op in &p.ops {
        img = apply(&img, op)?;
    }
    Ok(img)
}

fn blend(img: &RgbImage, base: impl Fn(u32, u32, usize) -> f32, factor: f32) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        Rgb([0, 1, 2].map(|c| {
            let b = base(x, y, c);
            (b + factor * (p[c] as f32 - b)).round().clamp(0.0, 255.0) as u8
        }))
    })
}

fn gray(p: [u8; 3]) -> f32 {
    // ITU-R 601-2 luma, as PIL's convert("L").
    (p[0] as f32 * 299.0 + p[1] as f32 * 587.0 + p[2] as f32 * 114.0) / 1000.0
}

/// Inverse-mapped affine transform about the image centre, nearest neighbour, black fill.
/// `m` maps output coordinates (relative to the centre) to source coordinates.
fn affine(img: &RgbImage, m: [f32; 6]) -> RgbImage {
    let (w, h) = img.dimensions();
    let (cx, cy) = (w as f32 * 0.5, h as f32 * 0.5);
    RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let sx = m[0] * dx + m[1] * dy + m[2] + cx;
        let sy = m[3] * dx + m[4] * dy + m[5] + cy;
        let (ix, iy) = (sx.floor(), sy.floor());
        if ix >= 0.0 && iy >= 0.0 && (ix as u32) < w && (iy as u32) < h {
            *img.get_pixel(ix as u32, iy as u32)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

fn apply(img: &RgbImage, op: &Op) -> Result<RgbImage, String> {
    let (w, h) = img.dimensions();
    let v = op.value;
    Ok(match op.op.as_str() {
        "Identity" => img.clone(),
        "ShearX" => affine(img, [1.0, v, 0.0, 0.0, 1.0, 0.0]),
        "ShearY" => affine(img, [1.0, 0.0, 0.0, v, 1.0, 0.0]),
        "TranslateX" => affine(img, [1.0, 0.0, -v * w as f32, 0.0, 1.0, 0.0]),
        "TranslateY" => affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, -v * h as f32]),
        "Rotate" => {
            // Counter-clockwise by `v` degrees on screen; the inverse map turns back.
            let (s, c) = v.to_radians().sin_cos();
            affine(img, [c, -s, 0.0, s, c, 0.0])
        }
        "Brightness" => blend(img, |_, _, _| 0.0, 1.0 + v),
        "Color" => blend(img, |x, y, _| gray(img.get_pixel(x, y).0), 1.0 + v),
        "Contrast" => {
            let mean = img.pixels().map(|p| gray(p.0).round()).sum::<f32>() / (w * h).max(1) as f32;
            let mean = mean.round();
            blend(img, |_, _, _| mean, 1.0 + v)
        }
        "Sharpness" => {
            // PIL's SMOOTH filter ([1 1 1; 1 5 1; 1 1 1] / 13); border pixels are kept.
            let smooth = |x: u32, y: u32, c: usize| -> f32 {
                if x == 0 || y == 0 || x + 1 >= w || y + 1 >= h {
                    return img.get_pixel(x, y).0[c] as f32;
                }
                let mut acc = 0.0;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let k = if dx == 1 && dy == 1 { 5.0 } else { 1.0 };
                        acc += k * img.get_pixel(x + dx - 1, y + dy - 1).0[c] as f32;
                    }
                }
                (acc / 13.0).round()
            };
            blend(img, smooth, 1.0 + v)
        }
        "Posterize" => {
            let bits = v.round().clamp(1.0, 8.0) as u32;
            let mask = !((1u32 << (8 - bits)) - 1) as u8;
            let mut out = img.clone();
            out.iter_mut().for_each(|p| *p &= mask);
            out
        }
        "Solarize" => {
            let mut out = img.clone();
            out.iter_mut().for_each(|p| {
                if *p as f32 >= v {
                    *p = 255 - *p
                }
            });
            out
        }
        "AutoContrast" => {
            let mut out = img.clone();
            for c in 0..3 {
                let (lo, hi) = img.pixels().fold((255u8, 0u8), |(lo, hi), p| (lo.min(p.0[c]), hi.max(p.0[c])));
                if hi > lo {
                    let scale = 255.0 / (hi - lo) as f32;
                    out.pixels_mut().for_each(|p| p.0[c] = ((p.0[c] - lo) as f32 * scale).round().clamp(0.0, 255.0) as u8);
                }
            }
            out
        }
        "Equalize" => {
            // PIL's ImageOps.equalize, per channel.
            let mut out = img.clone();
            for c in 0..3 {
                let mut hist = [0u32; 256];
                img.pixels().for_each(|p| hist[p.0[c] as usize] += 1);
                let nonzero: Vec<u32> = hist.iter().copied().filter(|n| *n > 0).collect();
                let step = (nonzero.iter().sum::<u32>() - nonzero.last().copied().unwrap_or(0)) / 255;
                if step == 0 {
                    continue;
                }
                let mut lut = [0u8; 256];
                let mut n = step / 2;
                for (i, count) in hist.iter().enumerate() {
                    lut[i] = (n / step).min(255) as u8;
                    n += count;
                }
                out.pixels_mut().for_each(|p| p.0[c] = lut[p.0[c] as usize]);
            }
            out
        }
        other => return Err(format!("unknown augmentation op {other:?}; known: {}", OPS.join(", "))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_fit_the_image() {
        let spec = AugmentSpec::default();
        for view in 0..50 {
            let a = draw(&mut rng_for("0123456789abcdef0123456789abcdef", view, 7), 300, 200, &spec);
            let b = draw(&mut rng_for("0123456789abcdef0123456789abcdef", view, 7), 300, 200, &spec);
            assert_eq!(a, b);
            assert!(a.crop_x + a.crop_w <= 300 && a.crop_y + a.crop_h <= 200 && a.crop_w > 0 && a.crop_h > 0);
            assert_eq!(a.ops.len(), 2);
        }
        let other = draw(&mut rng_for("0123456789abcdef0123456789abcdef", 0, 8), 300, 200, &spec);
        assert_ne!(other, draw(&mut rng_for("0123456789abcdef0123456789abcdef", 0, 7), 300, 200, &spec));
    }

    #[test]
    fn levels_follow_torchvision_at_magnitude_9() {
        assert!((level("Rotate", 9) - 9.0).abs() < 1e-5);
        assert!((level("ShearX", 9) - 0.09).abs() < 1e-6);
        assert_eq!(level("Posterize", 9), 7.0);
        assert!((level("Solarize", 9) - 178.5).abs() < 1e-4);
    }

    #[test]
    fn identity_view_is_a_resize() {
        let img = RgbImage::from_fn(40, 30, |x, y| Rgb([x as u8 * 5, y as u8 * 7, 100]));
        let v = render(&img, &ViewParams::identity(40, 30), 40).unwrap();
        assert_eq!(v.dimensions(), (40, 40));
        assert!(render(&img, &ViewParams { crop_x: 30, crop_w: 20, ..ViewParams::identity(40, 30) }, 16).is_err());
    }
}
