//! 64-bit DCT perceptual hash, after the `imagehash` package's `phash` (hash_size 8,
//! highfreq_factor 4): 32×32 (area average), grayscale, 2-D DCT-II, the 8×8 lowest frequencies compared with
//! their median. Bits are row-major, the first bit the highest, as imagehash prints them in hex.
//! Reference: https://github.com/JohannesBuchner/imagehash/blob/master/imagehash/__init__.py

use image::RgbImage;

use crate::config::ResizeFilter;

const N: usize = 32;

/// cos(pi k (2n+1) / 2N) for the 8 lowest frequencies k, row-major by k: the same for every image.
static COS: std::sync::LazyLock<[f64; 8 * N]> = std::sync::LazyLock::new(|| {
    std::array::from_fn(|i| {
        let (k, n) = (i / N, i % N);
        (std::f64::consts::PI * k as f64 * (2 * n + 1) as f64 / (2 * N) as f64).cos()
    })
});

pub fn phash(img: &RgbImage) -> u64 {
    // 32x32 by area averaging. imagehash resamples with PIL's Lanczos; only the 8x8 lowest
    // frequencies are kept, on which the two agree, and the box filter costs a tenth as much
    // (benches/imaging.rs, phash group: 26 us vs 213 us from 400x300).
    let small = super::resize_rgb(img, N as u32, N as u32, None, ResizeFilter::Box)
        .unwrap_or_else(|_| RgbImage::new(N as u32, N as u32));
    // PIL's "L" conversion: L = R*299/1000 + G*587/1000 + B*114/1000.
    let mut gray = [0f64; N * N];
    for (g, p) in gray.iter_mut().zip(small.pixels()) {
        *g = (p.0[0] as f64 * 299.0 + p.0[1] as f64 * 587.0 + p.0[2] as f64 * 114.0) / 1000.0;
    }
    let cos = &*COS;
    // DCT along rows (first 8 frequencies), then along columns.
    let mut rows = [[0f64; 8]; N];
    for (y, row) in rows.iter_mut().enumerate() {
        for (k, out) in row.iter_mut().enumerate() {
            *out = (0..N).map(|x| gray[y * N + x] * cos[k * N + x]).sum::<f64>() * 2.0;
        }
    }
    let mut low = [0f64; 64];
    for ky in 0..8 {
        for kx in 0..8 {
            low[ky * 8 + kx] = (0..N).map(|y| rows[y][kx] * cos[ky * N + y]).sum::<f64>() * 2.0;
        }
    }
    let mut sorted = low;
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let median = (sorted[31] + sorted[32]) / 2.0;
    low.iter().fold(0u64, |h, &v| (h << 1) | (v > median) as u64)
}

/// Number of differing bits.
pub fn distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_images_hash_close_and_different_ones_far() {
        use crate::synth::world::{render, sample, WorldSpec};
        let spec = WorldSpec { count: 2, seed: 3, min_size: (320, 240), max_size: (320, 240), ..Default::default() };
        let a = render(&sample(&spec, 0)).0;
        let b = super::super::resize_rgb(&a, 160, 120, None, ResizeFilter::Bilinear).unwrap();
        let c = render(&sample(&spec, 1)).0;
        assert!(distance(phash(&a), phash(&b)) <= 4, "{}", distance(phash(&a), phash(&b)));
        assert!(distance(phash(&a), phash(&c)) > 12, "{}", distance(phash(&a), phash(&c)));
    }
}
