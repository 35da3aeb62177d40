//! Model-stage throughput on the fixture models, printed as JSON lines for
//! `benches/models_vs_python.sh` (which runs onnxruntime-Python on the same files and batches and
//! prints the ratios). Run: `cargo bench --no-default-features --bench models -- [cpu|cuda] [threads]`.

use std::path::PathBuf;
use std::time::Instant;

use image::RgbImage;
use recap::models::{Captioner, Clip, Decoding, Device, GenerateOptions, SessionOptions};

fn images(n: usize) -> Vec<RgbImage> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/images");
    let base: Vec<RgbImage> = (0..4).map(|i| image::open(dir.join(format!("{i:02}_64.png"))).unwrap().to_rgb8()).collect();
    (0..n).map(|i| base[i % base.len()].clone()).collect()
}

/// Seconds per call: after a warm-up, at least `reps` calls and at least 2 s of them.
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    f(); // warm-up
    let t = Instant::now();
    let mut n = 0;
    while n < reps || t.elapsed().as_secs_f64() < 2.0 {
        std::hint::black_box(f());
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let device = Device::parse(args.first().map(String::as_str).unwrap_or("cpu")).unwrap();
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let opts = SessionOptions { device, intra_threads: threads };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    let batch = 32;
    let imgs = images(batch);
    let refs: Vec<&RgbImage> = imgs.iter().collect();

    let mut cap = Captioner::load(&root.join("shapeworld-captioner"), &opts).unwrap();
    let seeds: Vec<u64> = (0..batch as u64).collect();
    for (name, decoding, k) in [
        ("greedy", Decoding::Greedy, 1),
        ("sample_top_p0.9_k5", Decoding::Sample { temperature: 1.0, top_k: 0, top_p: 0.9 }, 5),
    ] {
        let o = GenerateOptions { decoding, num_captions: k, max_new_tokens: 40 };
        let s = time(5, || cap.generate(&refs, &seeds, &o).unwrap());
        println!(
            "{{\"bench\": \"captioner_{name}\", \"device\": \"{device}\", \"batch\": {batch}, \"captions_per_s\": {:.1}}}",
            (batch * k) as f64 / s
        );
    }

    drop(cap); // its sessions' thread pools must not compete with the next model's
    for name in ["shapeworld-clip-a", "shapeworld-clip-b"] {
        let mut clip = Clip::load(&root.join(name), &opts).unwrap();
        let bs = 64;
        let imgs = images(bs);
        let refs: Vec<&RgbImage> = imgs.iter().collect();
        // Model time alone (pixel values made once), as the Python side measures it.
        let px = clip.pixel_values(&refs).unwrap();
        let s = time(20, || clip.embed_pixels(&px, bs).unwrap());
        println!("{{\"bench\": \"{name}_images\", \"device\": \"{device}\", \"batch\": {bs}, \"per_s\": {:.1}}}", bs as f64 / s);
        let s = time(20, || clip.embed_images(&refs).unwrap());
        println!("{{\"bench\": \"{name}_images_with_preprocessing\", \"device\": \"{device}\", \"batch\": {bs}, \"per_s\": {:.1}}}", bs as f64 / s);
        let texts: Vec<String> = (0..bs).map(|i| format!("a small red circle at the top left and a large blue square number {i}")).collect();
        let trefs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let s = time(20, || clip.embed_texts(&trefs).unwrap());
        println!("{{\"bench\": \"{name}_texts\", \"device\": \"{device}\", \"batch\": {bs}, \"per_s\": {:.1}}}", bs as f64 / s);
    }
}
