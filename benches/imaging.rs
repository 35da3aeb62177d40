//! The CPU floor of a run: decode + resize + encode of one downloaded image, per image size and
//! format, with and without reduced-scale JPEG decoding. `cargo bench --bench imaging`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use recap::config::ImageConfig;
use recap::synth::world::{image_bytes, photo_like, render, sample, WorldSpec};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_resize_encode");
    group.throughput(Throughput::Elements(1));
    for (w, h, png) in [(400, 300, false), (800, 600, false), (1600, 1200, false), (800, 600, true)] {
        let spec = WorldSpec { count: 1, seed: 1, min_size: (w, h), max_size: (w, h), png_fraction: if png { 1.0 } else { 0.0 }, ..Default::default() };
        let s = sample(&spec, 0);
        let (img, _, _) = render(&s);
        let bytes = image_bytes(&s, &img).expect("encodes");
        let label = format!("{w}x{h}.{}", if png { "png" } else { "jpg" });
        for reduced in [true, false] {
            if png && !reduced {
                continue;
            }
            let cfg = ImageConfig { size: 256, reduced_decode: reduced, ..Default::default() };
            let id = BenchmarkId::new(if reduced { "reduced_decode" } else { "full_decode" }, &label);
            group.bench_with_input(id, &bytes, |b, bytes| b.iter(|| recap::imaging::process(bytes, &cfg).expect("processes")));
        }
    }
    group.finish();

    // Photo-like JPEGs (~1.9 bits/pixel, `recap synth --photo`): the whole path with and without
    // reduced decoding, and the decoders alone: zune-jpeg and libjpeg-turbo at full size, and
    // libjpeg-turbo's scaled IDCT at 4/8, 2/8, 1/8 (with SIMD when nasm was there at build time).
    eprintln!("{}", recap::imaging::jpeg::simd_note());
    let mut group = c.benchmark_group("photo");
    group.throughput(Throughput::Elements(1));
    for (w, h) in [(1024, 768), (2048, 1536)] {
        let spec = WorldSpec { count: 1, seed: 1, min_size: (w, h), max_size: (w, h), png_fraction: 0.0, ..Default::default() };
        let s = sample(&spec, 0);
        let (img, _, _) = render(&s);
        let bytes = image_bytes(&s, &photo_like(&img, 1, 0)).expect("encodes");
        let label = format!("{w}x{h}");
        for reduced in [true, false] {
            let cfg = ImageConfig { size: 256, reduced_decode: reduced, ..Default::default() };
            let id = BenchmarkId::new(if reduced { "process_reduced" } else { "process_full" }, &label);
            group.bench_with_input(id, &bytes, |b, bytes| b.iter(|| recap::imaging::process(bytes, &cfg).expect("processes")));
        }
        group.bench_with_input(BenchmarkId::new("zune_full", &label), &bytes, |b, bytes| {
            b.iter(|| image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg).expect("decodes"))
        });
        for k in [8, 4, 2, 1] {
            group.bench_with_input(BenchmarkId::new(format!("libjpeg_{k}of8"), &label), &bytes, |b, bytes| {
                b.iter(|| recap::imaging::jpeg::decode_scaled(bytes, k).expect("decodes"))
            });
            group.bench_with_input(BenchmarkId::new(format!("libjpeg_{k}of8_fast"), &label), &bytes, |b, bytes| {
                b.iter(|| recap::imaging::jpeg::decode_scaled_opts(bytes, k, true, Vec::new()).expect("decodes"))
            });
        }
    }
    group.finish();

    // The perceptual hash alone, on decoded sizes a run sees (after reduced decoding).
    let mut group = c.benchmark_group("phash");
    for (w, h) in [(400, 300), (800, 600)] {
        let spec = WorldSpec { count: 1, seed: 1, min_size: (w, h), max_size: (w, h), ..Default::default() };
        let (img, _, _) = render(&sample(&spec, 0));
        group.bench_with_input(BenchmarkId::new("phash", format!("{w}x{h}")), &img, |b, img| {
            b.iter(|| recap::imaging::phash::phash(img))
        });
        group.bench_with_input(BenchmarkId::new("box_to_32", format!("{w}x{h}")), &img, |b, img| {
            b.iter(|| recap::imaging::resize_rgb(img, 32, 32, None, recap::config::ResizeFilter::Box).expect("resizes"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
