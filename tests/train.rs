//! `recap train` end to end on reinforced shards that `recap run` writes from a served
//! shapeworld with the fixture captioner and teachers: the replayed views are the teachers'
//! views, a fixed batch is driven near zero loss, a resumed run continues with the same batches
//! and losses, and bad inputs get clear messages.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use recap::models::{Clip, SessionOptions};
use recap::train::{self, data};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Fixture {
    _world: common::World,
    reinforced: PathBuf,
    plain: PathBuf,
}

/// One world, run twice: with the model stages (reinforced shards) and without (plain shards).
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let w = common::world(40, 0, "", recap::synth::ServeOptions::default()).await;
            let reinforced = w.tmp.path().join("reinforced");
            let p = common::pipeline(&w, &reinforced, 20, "", "");
            let m = root().join("models");
            let stages = format!(
                "caption:\n  model: {m}/shapeworld-captioner\n  num_captions: 2\n  max_new_tokens: 30\n  batch_size: 16\n  intra_threads: 1\n\
                 score:\n  teachers: [{m}/shapeworld-clip-a, {m}/shapeworld-clip-b]\n  augmentations: 3\n  batch_size: 32\n  intra_threads: 1\n",
                m = m.display()
            );
            let text = std::fs::read_to_string(&p).unwrap().replace("output:", &format!("{stages}output:"));
            std::fs::write(&p, text).unwrap();
            let plan = recap::config::load(&p, &[]).unwrap();
            recap::engine::run(&plan, &Default::default()).await.unwrap();
            let plain = w.tmp.path().join("plain");
            let p = common::pipeline(&w, &plain, 20, "", "");
            let plan = recap::config::load(&p, &[]).unwrap();
            recap::engine::run(&plan, &Default::default()).await.unwrap();
            Fixture { _world: w, reinforced, plain }
        })
    })
}

/// pipelines/train-tiny.yaml with the three driving keys and any other overrides.
fn plan(shards: &Path, out: &Path, steps: u64, extra: &[&str]) -> recap::Result<train::TrainPlan> {
    let mut sets = vec![
        format!("data.shards={}", shards.display()),
        format!("output.dir={}", out.display()),
        format!("train.steps={steps}"),
        format!("model.tokenizer={}", root().join("models/shapeworld-clip-a").display()),
        "train.batch_size=8".to_string(),
        "data.shuffle_buffer=16".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    train::load(&root().join("pipelines/train-tiny.yaml"), &sets)
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn replayed_views_are_the_views_the_teachers_embedded() {
    let f = fixture();
    let set = std::sync::Arc::new(data::ShardSet::open(f.reinforced.to_str().unwrap()).unwrap());
    assert_eq!(set.teachers.len(), 2);
    let mut stream = data::EpochStream::new(set.clone(), 0, 0, 1);
    let opts = SessionOptions { intra_threads: 1, ..Default::default() };
    let mut teachers: Vec<Clip> = set.teachers.iter().map(|t| Clip::load(Path::new(&t.model), &opts).unwrap()).collect();
    let slices = set.slices();
    let mut checked = 0;
    for _ in 0..4 {
        let row = stream.next_row().unwrap().unwrap();
        let img = image::load_from_memory(&row.image).unwrap().to_rgb8();
        assert_eq!(row.views.len(), 4, "the original and 3 augmentations");
        for (t, clip) in teachers.iter_mut().enumerate() {
            let side = clip.image_hw.0.max(clip.image_hw.1);
            let views: Vec<image::RgbImage> = (0..row.views.len()).map(|v| data::replay_view(&img, &row.views, v, side).unwrap()).collect();
            let refs: Vec<&image::RgbImage> = views.iter().collect();
            let emb = clip.embed_images(&refs).unwrap();
            let (off, d) = slices[t];
            for v in 0..row.views.len() {
                let stored: Vec<f32> = row.image_emb[v * set.dim + off..v * set.dim + off + d].iter().map(|x| x.to_f32()).collect();
                let got = &emb[v * d..(v + 1) * d];
                let diff = stored.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // float16 storage: ~1e-3 at most on unit vectors.
                assert!(diff < 2e-3, "teacher {t} view {v}: replayed view embeds {diff} away from the stored embedding");
                if v > 0 {
                    // And the check has teeth: another view's embedding is far from it.
                    let other = &emb[0..d];
                    let far = stored.iter().zip(other).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(far > 1e-2, "view {v} and view 0 embed alike ({far}); the test would not see a wrong view");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * 2 * 4);
}

#[test]
fn a_fixed_batch_is_driven_near_zero_loss() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let p = plan(&f.reinforced, out.path(), 300, &["loss.distill_weight=0", "data.synthetic_prob=1.0", "optim.weight_decay=0"]).unwrap();
    let opts = data::LoaderOptions { batch_size: 8, shuffle_buffer: 16, workers: 1, prefetch: 1, seed: 0 };
    let prep = data::Prep {
        image_size: p.shape.vision.image_size as u32,
        processor: data::student_processor(p.shape.vision.image_size as u32),
        tokenizer: p.tokenizer.clone(),
        eos: p.shape.eos_token_id,
        synthetic_prob: 1.0,
        dual: false,
        sequential_views: false,
        seed: 0,
        slices: p.shards.slices(),
    };
    let batch = data::Loader::start(p.shards.clone(), prep, &opts, data::Position::default()).next_batch().unwrap();
    assert_eq!(batch.size, 8);
    let clip = train::model::Clip::init(&p.shape, 0, &candle_core::Device::Cpu).unwrap();
    let mut t = train::Trainer::new(p.step_spec(), clip).unwrap();
    let (first, ..) = t.step(&batch, 2e-3).unwrap();
    let mut last = first;
    for _ in 0..299 {
        last = t.step(&batch, 2e-3).unwrap().1;
    }
    assert!(first > 1.5, "first loss {first}: ln 8 ≈ 2.08 expected from random weights");
    assert!(last < 0.05, "contrastive loss after 300 steps on one batch: {last} (first {first})");
}

#[test]
fn a_resumed_run_continues_with_the_same_batches_and_losses() {
    let f = fixture();
    let a = tempfile::tempdir().unwrap();
    let extra = ["train.checkpoint_every=3", "train.log_every=1", "train.keep_checkpoints=3", "loss.mode=dr", "optim.warmup_steps=2"];
    let s = train::run(plan(&f.reinforced, a.path(), 6, &extra).unwrap(), &Default::default()).unwrap();
    assert_eq!(s.steps, 6);
    assert_eq!(s.samples_seen, 48);
    assert!(a.path().join("model/model.safetensors").is_file() && a.path().join("model/config.json").is_file());
    let full = metrics(a.path());
    assert_eq!(full.len(), 6);
    // What a kill after the step-3 checkpoint leaves: checkpoint 3, metrics up to step 6 (later
    // lines are dropped on resume), no final model.
    let b = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(b.path().join("checkpoints")).unwrap();
    let src = a.path().join("checkpoints/step-00000003");
    let dst = b.path().join("checkpoints/step-00000003");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    std::fs::copy(a.path().join("metrics.jsonl"), b.path().join("metrics.jsonl")).unwrap();
    // Without --resume an existing run is not overwritten.
    let e = train::run(plan(&f.reinforced, b.path(), 6, &extra).unwrap(), &Default::default()).err().unwrap().to_string();
    assert!(e.contains("already holds a run") && e.contains("--resume"), "{e}");
    let s = train::run(plan(&f.reinforced, b.path(), 6, &extra).unwrap(), &train::TrainOptions { resume: true, progress: false }).unwrap();
    assert_eq!(s.resumed_from, Some(3));
    assert_eq!(s.samples_seen, 48);
    let resumed = metrics(b.path());
    assert_eq!(resumed.len(), 6);
    for (x, y) in full.iter().zip(&resumed) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["samples"], y["samples"]);
        assert_eq!(x["epoch"], y["epoch"]);
        let (l1, l2) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((l1 - l2).abs() < 1e-5, "step {}: loss {l1} uninterrupted, {l2} resumed", x["step"]);
        assert_eq!(x["lr"], y["lr"]);
    }
    let sa: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.path().join("checkpoints/step-00000006/state.json")).unwrap()).unwrap();
    let sb: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(b.path().join("checkpoints/step-00000006/state.json")).unwrap()).unwrap();
    assert_eq!(sa["position"], sb["position"]);
    // A checkpoint of another shape is refused, naming it.
    let e = train::run(plan(&f.reinforced, b.path(), 6, &["model.vision.width=32"]).unwrap(), &train::TrainOptions { resume: true, progress: false })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("step-00000006") && e.contains("another model shape"), "{e}");
    // ... and so is one trained with another seed (the data order would change).
    let e = train::run(plan(&f.reinforced, b.path(), 6, &["train.seed=1"]).unwrap(), &train::TrainOptions { resume: true, progress: false })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("train.seed 0") && e.contains("the config says 1"), "{e}");
}

#[test]
fn bad_inputs_get_clear_messages() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    // Plain shards: no reinforcement.
    let e = plan(&f.plain, out.path(), 2, &[]).err().unwrap().to_string();
    assert!(e.contains("data.shards") && e.contains("00000.parquet") && e.contains("augmentations, image_embeddings, text_embeddings"), "{e}");
    // An empty directory.
    let empty = tempfile::tempdir().unwrap();
    let e = plan(empty.path(), out.path(), 2, &[]).err().unwrap().to_string();
    assert!(e.contains("holds no shards"), "{e}");
    // Teacher scales that do not match the shards' teachers.
    let e = plan(&f.reinforced, out.path(), 2, &["loss.teacher_scales=[70, 60, 50]"]).err().unwrap().to_string();
    assert!(e.contains("loss.teacher_scales: 3 values for 2 teachers") && e.contains("shapeworld-clip-b 48-d"), "{e}");
    // Teachers of other widths than the config expects.
    let e = plan(&f.reinforced, out.path(), 2, &["data.teacher_dims=[768, 768]"]).err().unwrap().to_string();
    assert!(e.contains("data.teacher_dims: [768, 768] expected") && e.contains("widths [64, 48]") && e.contains("00000.parquet"), "{e}");
    // A shard scored by other teachers than the first one: named when the stream reaches it.
    let mixed = tempfile::tempdir().unwrap();
    std::fs::copy(f.reinforced.join("00000.parquet"), mixed.path().join("00000.parquet")).unwrap();
    let (batch, _) = recap::sink::read_shard(&f.reinforced.join("00001.parquet")).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new("recap.teachers".into(), r#"[{"model":"other-clip","dim":112}]"#.to_string())]))
        .build();
    let file = std::fs::File::create(mixed.path().join("00001.parquet")).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let e = train::run(plan(mixed.path(), &out.path().join("mixed"), 6, &[]).unwrap(), &Default::default()).err().unwrap().to_string();
    assert!(e.contains("00001.parquet") && e.contains("other-clip (112-d)") && e.contains("differ from the other shards'"), "{e}");
    // A CUDA device in a build without the cuda feature: at train.device, with what to do.
    let e = plan(&f.reinforced, out.path(), 2, &["train.device=cuda:1"]).err().unwrap().to_string();
    assert!(e.contains("train.device") && e.contains("--features cuda"), "{e}");
    // A diverging run stops with the step and what to do, never a panic.
    let e = train::run(plan(&f.reinforced, out.path(), 20, &["optim.lr=1e12", "optim.grad_clip=null", "optim.warmup_steps=0"]).unwrap(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("the loss is") && e.contains("Lower optim.lr"), "{e}");
}

#[test]
fn a_trained_student_is_evaluated_like_a_teacher() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    // The world the shards came from has its eval.parquet; the run directory is the model.
    let data = f._world.dir.join("eval.parquet");
    let with_eval = [format!("data.eval_set={}", data.display()), "train.eval_every=3".to_string()];
    let with_eval: Vec<&str> = with_eval.iter().map(String::as_str).collect();
    let s = train::run(plan(&f.reinforced, out.path(), 3, &with_eval).unwrap(), &Default::default()).unwrap();
    assert_eq!(s.steps, 3);
    assert_eq!(s.last_zero_shot.len(), 4, "{s:?}");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_recap"))
        .args(["eval", "--json", "--model"])
        .arg(out.path())
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let r: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    for task in ["shape", "color", "background", "count"] {
        let t = r["zero_shot"][task]["top1"].as_f64().unwrap_or_else(|| panic!("no zero_shot.{task}.top1 in {r}"));
        // The evaluation during training (last step) and `recap eval` of the saved model agree.
        assert!((t - s.last_zero_shot[task]).abs() < 1e-9, "{task}: {t} by recap eval, {} in training", s.last_zero_shot[task]);
    }
    let last = metrics(out.path()).pop().unwrap();
    assert_eq!(last["zero_shot"].as_object().unwrap().len(), 4, "{last}");
    assert_eq!(r["retrieval"]["n"], 40);
    assert!(r["retrieval"]["image_to_text"]["r1"].as_f64().is_some());
    // The student's directory is a Hugging Face CLIP layout.
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("model/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "CLIPModel");
    assert_eq!(cfg["vision_config"]["patch_size"], 8);
}

#[test]
fn a_student_of_the_teachers_shape_inherits_it_exactly() {
    use recap::train::eval::{Embedder, StudentModel};
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let teacher = root().join("models/shapeworld-clip-a");
    let same = [
        "model.vision.mlp_dim=128",
        "model.text.mlp_dim=128",
        "model.text.context_length=64",
        &format!("model.init_from={}", teacher.display()),
    ];
    let p = plan(&f.reinforced, out.path(), 1, &same).unwrap();
    let clip = train::model::Clip::init(&p.shape, 7, &candle_core::Device::Cpu).unwrap();
    let got = train::inherit::inherit(&clip, teacher.to_str().unwrap()).unwrap();
    assert_eq!((got.whole, got.sliced, got.partial.len()), (clip.params.vars.len(), 0, 0));
    let dir = out.path().join("student");
    train::write_model_dir(&clip, &teacher, &dir).unwrap();
    // The candle student and the teacher's ONNX export (Hugging Face CLIPModel through optimum)
    // embed images and texts alike: the model code and the weight names are Hugging Face's.
    let mut student = StudentModel::load(&dir).unwrap();
    let opts = SessionOptions { intra_threads: 1, ..Default::default() };
    let mut onnx = Clip::load(&teacher, &opts).unwrap();
    let world = recap::synth::load_samples(&f._world.dir).unwrap();
    let images: Vec<image::RgbImage> = world.iter().filter(|s| !s.corrupt).take(6).map(|s| image::open(f._world.dir.join(&s.file)).unwrap().to_rgb8()).collect();
    let texts: Vec<String> = world.iter().take(6).map(|s| s.caption.clone()).chain(["a red circle.".to_string(), String::new()]).collect();
    let close = |a: Vec<Vec<f32>>, b: Vec<Vec<f32>>, what: &str| {
        let d = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "{what}: the inherited student differs from the ONNX teacher by {d}");
    };
    close(Embedder::embed_images(&mut student, &images).unwrap(), Embedder::embed_images(&mut onnx, &images).unwrap(), "images");
    close(Embedder::embed_texts(&mut student, &texts).unwrap(), Embedder::embed_texts(&mut onnx, &texts).unwrap(), "texts");

    // A smaller student: one layer, width 32 in 2 heads of 16 (the teacher: 2 layers, 4 heads of 16).
    let small = ["model.text.layers=1", "model.text.width=32", "model.text.heads=2", &format!("model.init_from={}", teacher.display())];
    let p = plan(&f.reinforced, out.path(), 1, &small).unwrap();
    let clip = train::model::Clip::init(&p.shape, 7, &candle_core::Device::Cpu).unwrap();
    let got = train::inherit::inherit(&clip, teacher.to_str().unwrap()).unwrap();
    assert!(got.sliced > 0 && got.layers.contains(&("text_model".to_string(), 0, 0)));
    let t = candle_core::safetensors::load(teacher.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let q_t: Vec<Vec<f32>> = t["text_model.encoder.layers.0.self_attn.q_proj.weight"].to_vec2().unwrap();
    let q_s: Vec<Vec<f32>> = clip.params.vars["text_model.encoder.layers.0.self_attn.q_proj.weight"].as_tensor().to_vec2().unwrap();
    assert_eq!(q_s.len(), 32);
    for r in 0..32 {
        assert_eq!(q_s[r][..], q_t[r][..32], "row {r}: the first 2 heads, the first 32 input dims");
    }
    // The student's MLP (256 wide in the tiny preset) is wider than the teacher's (128): partly inherited.
    assert!(got.partial.iter().any(|n| n.contains("mlp.fc1")), "{got:?}");
    // A teacher whose images do not line up with the student's is refused at plan time.
    let e = plan(&f.reinforced, out.path(), 1, &["model.vision.image_size=96", &format!("model.init_from={}", teacher.display())]).err().unwrap().to_string();
    assert!(e.contains("model.init_from") && e.contains("position embeddings"), "{e}");
}

#[test]
fn the_clip_score_filter_trains_on_the_top_rows_only() {
    use arrow::array::{Array, Float32Array, StringArray};
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    // What the shards hold: the uid and clip_score of every ok row.
    let mut scored = Vec::new();
    for file in ["00000.parquet", "00001.parquet"] {
        let (b, _) = recap::sink::read_shard(&f.reinforced.join(file)).unwrap();
        let status = b.column_by_name("status").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        let uid = b.column_by_name("uid").unwrap().as_any().downcast_ref::<StringArray>().unwrap();
        let score = b.column_by_name("clip_score").unwrap().as_any().downcast_ref::<Float32Array>().unwrap();
        for i in 0..b.num_rows() {
            if status.value(i) == "ok" && !score.is_null(i) {
                scored.push((uid.value(i).to_string(), score.value(i)));
            }
        }
    }
    assert!(scored.len() >= 20, "{}", scored.len());
    let p = plan(&f.reinforced, out.path(), 2, &["data.clip_score_top_fraction=0.3"]).unwrap();
    let filter = p.filter.clone().unwrap();
    let want = (scored.len() as f64 * 0.3).ceil() as u64;
    assert_eq!(filter.kept_rows, want, "{filter:?}");
    let mut sorted: Vec<f32> = scored.iter().map(|s| s.1).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(filter.min_clip_score, sorted[want as usize - 1]);
    // The stream yields exactly the kept rows, each once per epoch.
    let kept: std::collections::BTreeSet<String> = scored.iter().filter(|s| s.1 >= filter.min_clip_score).map(|s| s.0.clone()).collect();
    let mut stream = data::EpochStream::new(p.shards.clone(), 0, 0, 4);
    let mut seen = std::collections::BTreeSet::new();
    while let Some(r) = stream.next_row().unwrap() {
        assert!(seen.insert(r.uid.clone()), "{} twice", r.uid);
    }
    assert_eq!(seen, kept);
    let s = train::run(p, &Default::default()).unwrap();
    assert_eq!(s.filter.unwrap().kept_rows, want);
    // A threshold nobody passes is refused at its key.
    let e = plan(&f.reinforced, out.path(), 2, &["data.min_clip_score=1.5"]).err().unwrap().to_string();
    assert!(e.contains("data.min_clip_score") && e.contains("keeps none of the"), "{e}");
}
