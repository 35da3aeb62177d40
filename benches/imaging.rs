//! The CPU floor of a run: decode + resize + encode of one downloaded image, per image size and
//! format, with and without reduced-scale JPEG decoding. `cargo bench --bench imaging`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use recap::config::ImageConfig;
use recap::synth::world::{image_bytes, render, sample, WorldSpec};

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
