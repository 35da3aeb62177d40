//! The trainer's hot paths, outside criterion (one step is long): prints one JSON line per figure.
//!
//!   cargo bench --no-default-features --bench train -- step tiny|small|vit_b16 THREADS BATCH [STEPS]
//!       median seconds of one training step (forward, contrastive + distillation, backward,
//!       clipping, AdamW) on a fixed random batch; benches/train_python.py times the same
//!       architecture in PyTorch, and benches/train_vs_pytorch.sh prints the ratio.
//!   cargo bench --no-default-features --bench train -- finetune linear|decoder frozen|full THREADS BATCH [STEPS]
//!       median seconds of one dense finetuning step (segmentation head on clip-a's shapes);
//!       benches/finetune_python.py times the same in PyTorch.
//!   cargo bench --no-default-features --bench train -- data SHARDS_DIR WORKERS BATCH [BATCHES]
//!       samples/s of the data path alone: shards → decoded, replayed views, tokenised batches.

use std::time::Instant;

// As the recap binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use recap::train::config::{LossConfig, OptimConfig, Preset};
use recap::train::data::{self, Batch, Position};
use recap::train::model::Clip;
use recap::train::{StepSpec, Trainer};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn step(preset: &str, threads: usize, batch: usize, steps: usize) {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let preset = match preset {
        "tiny" => Preset::Tiny,
        "small" => Preset::Small,
        "vit_b16" => Preset::VitB16,
        other => panic!("unknown preset {other}"),
    };
    let mut shape = preset.shape(512);
    shape.eos_token_id = Some(3);
    let clip = Clip::init(&shape, 0, &Device::Cpu).unwrap();
    // Two teachers, 64 + 48 wide, as the fixture ensemble.
    let slices = vec![(0, 64), (64, 48)];
    let dim = 112;
    let spec = StepSpec {
        loss: LossConfig::default(),
        optim: OptimConfig::default(),
        slices: slices.clone(),
        teacher_scales: vec![100.0, 100.0],
        dim,
    };
    let mut t = Trainer::new(spec, clip).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let s = shape.vision.image_size;
    let len = 20;
    let mut unit = |n: usize| -> Vec<f32> {
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            for &(_, w) in &slices {
                let v: Vec<f32> = (0..w).map(|_| rng.random_range(-1.0..1.0)).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                out.extend(v.iter().map(|x| x / norm));
            }
        }
        out
    };
    let (teacher_img, teacher_txt) = (unit(batch), unit(batch));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let pixels: Vec<f32> = (0..batch * 3 * s * s).map(|_| rng.random_range(-1.5..1.5)).collect();
    let mut ids = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        ids.push(1u32);
        ids.extend((0..len - 2).map(|_| rng.random_range(4..512u32)));
        ids.push(3);
    }
    let b = Batch {
        size: batch,
        pixels,
        ids,
        len,
        pool_at: vec![(len - 1) as u32; batch],
        teacher_img,
        teacher_txt,
        after: Position::default(),
        skipped: Vec::new(),
    };
    for _ in 0..3 {
        t.step(&b, 1e-4).unwrap();
    }
    let mut times = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        t.step(&b, 1e-4).unwrap();
        times.push(t0.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({"bench": format!("step_{preset:?}").to_lowercase(), "threads": threads, "batch": batch, "seconds_per_step": median(times), "parameters": t.clip.params.count()})
    );
}

/// One finetuning step of a segmentation head (linear or decoder) on teacher clip-a's shape
/// (the tiny shapes: 64 px, patch 8, width 64), frozen or full; random batch, 5 classes.
fn finetune_step(head: &str, mode: &str, threads: usize, batch: usize, steps: usize) {
    use recap::train::finetune::{self, Finetuner};
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let yaml = std::fs::read_to_string("pipelines/finetune-tiny.yaml").unwrap();
    let cfg = finetune::parse_str(&yaml, "bench", &[format!("head.kind={head}"), format!("mode={mode}")]).unwrap();
    let student = recap::train::eval::StudentModel::load(std::path::Path::new("models/shapeworld-clip-a")).unwrap();
    let spec = recap::train::dense::DenseSpec {
        version: 1,
        classes: ["background", "circle", "square", "triangle", "diamond"].iter().map(|s| s.to_string()).collect(),
        ignore_index: None,
        depth_scale: 0.001,
        depth_unit: None,
    };
    let mut ft = Finetuner::new(student, &cfg, &spec).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let s = 64;
    let pixels: Vec<f32> = (0..batch * 3 * s * s).map(|_| rng.random_range(-1.5..1.5)).collect();
    let b = finetune::DenseBatch {
        pixels: candle_core::Tensor::from_vec(pixels, (batch, 3, s, s), &Device::Cpu).unwrap(),
        labels: (0..batch * s * s).map(|_| rng.random_range(0..5u32)).collect(),
        depth: Vec::new(),
    };
    for _ in 0..3 {
        ft.step(&b, 1e-4, 1e-5, Some(1.0)).unwrap();
    }
    let mut times = Vec::new();
    for _ in 0..steps {
        let t0 = Instant::now();
        ft.step(&b, 1e-4, 1e-5, Some(1.0)).unwrap();
        times.push(t0.elapsed().as_secs_f64());
    }
    println!("{}", serde_json::json!({"bench": format!("finetune_{head}_{mode}"), "threads": threads, "batch": batch, "seconds_per_step": median(times)}));
}

fn data_path(dir: &str, workers: usize, batch: usize, batches: usize) {
    let set = std::sync::Arc::new(data::ShardSet::open(dir).unwrap());
    let tok = recap::models::hf::TextTokenizer::load(std::path::Path::new("models/shapeworld-clip-a"), 32).unwrap();
    let prep = data::Prep {
        image_size: 64,
        processor: data::student_processor(64),
        tokenizer: std::sync::Arc::new(tok),
        eos: Some(3),
        synthetic_prob: 0.8,
        dual: false,
        sequential_views: false,
        seed: 0,
        slices: set.slices(),
    };
    let opts = data::LoaderOptions { batch_size: batch, shuffle_buffer: 1024, workers, prefetch: 8, seed: 0 };
    let mut loader = data::Loader::start(set, prep, &opts, Position::default());
    loader.next_batch().unwrap();
    let t0 = Instant::now();
    let mut n = 0;
    for _ in 0..batches {
        n += loader.next_batch().unwrap().size;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({"bench": "data_path", "workers": workers, "batch": batch, "samples_per_s": n as f64 / secs}));
}

fn main() {
    recap::train::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let get = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    match get(0, "step").as_str() {
        "step" => step(&get(1, "tiny"), get(2, "2").parse().unwrap(), get(3, "64").parse().unwrap(), get(4, "20").parse().unwrap()),
        "finetune" => finetune_step(&get(1, "linear"), &get(2, "frozen"), get(3, "2").parse().unwrap(), get(4, "16").parse().unwrap(), get(5, "20").parse().unwrap()),
        "data" => data_path(&get(1, "recap-demo/shards"), get(2, "2").parse().unwrap(), get(3, "64").parse().unwrap(), get(4, "50").parse().unwrap()),
        other => eprintln!("unknown bench {other}: expected step or data"),
    }
}
