//! `recap eval`: evaluation sets (`recap synth`'s eval.parquet, tools/eval_from_folders.py), and
//! the same zero-shot and retrieval measures for an ONNX teacher and a trained student.

use std::path::{Path, PathBuf};

use recap::train::eval::{self, EvalSet};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn world(dir: &Path, count: u64, seed: u64) -> PathBuf {
    let spec = recap::synth::WorldSpec { count, seed, min_size: (160, 120), max_size: (320, 240), corrupt: 2, ..Default::default() };
    recap::synth::generate(dir, &spec).unwrap();
    dir.join("eval.parquet")
}

fn recap_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_recap"))
}

#[test]
fn a_teachers_accuracy_on_a_synth_world_is_what_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let data = world(tmp.path(), 160, 31);
    let set = EvalSet::open(&data).unwrap();
    assert_eq!(set.images.len(), 158, "corrupt samples are left out");
    let names: Vec<&str> = set.spec.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["shape", "color", "background", "count"]);
    // shape and colour are labelled on single-object images only.
    let single = set.labels[0].iter().filter(|l| l.is_some()).count();
    assert_eq!(single, set.labels[1].iter().filter(|l| l.is_some()).count());
    assert!(single > 20 && single < 158);
    assert!(set.labels[2].iter().all(Option::is_some) && set.labels[3].iter().all(Option::is_some));
    let out = std::process::Command::new(recap_bin())
        .args(["eval", "--model", "models/shapeworld-clip-a", "--data"])
        .arg(&data)
        .arg("--json")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    let got = |p: &str| r.pointer(p).and_then(serde_json::Value::as_f64).unwrap_or_else(|| panic!("no {p} in {r}"));
    for (p, want) in KNOWN {
        assert!((got(p) - want).abs() < 0.011, "{p}: {} vs {want} recorded", got(p));
    }
}

/// clip-a on the world above (seed 31, 160 samples), as onnxruntime-Python with the Hugging Face
/// processor and CLIP's prompt ensembling computes them independently:
/// `recap synth --out /tmp/w31 --count 160 --seed 31 --min-size 160x120 --max-size 320x240 --corrupt 2`, then
/// `python tools/references/eval_reference.py models/shapeworld-clip-a /tmp/w31/eval.parquet`
/// (hits: shape 36/39, color 39/39, background 56/158, count 38/158; retrieval image→text R@1
/// 62/158, text→image R@5 151/158).
const KNOWN: [(&str, f64); 6] = [
    ("/zero_shot/shape/top1", 36.0 / 39.0),
    ("/zero_shot/color/top1", 1.0),
    ("/zero_shot/background/top1", 56.0 / 158.0),
    ("/zero_shot/count/top1", 38.0 / 158.0),
    ("/retrieval/image_to_text/r1", 62.0 / 158.0),
    ("/retrieval/text_to_image/r5", 151.0 / 158.0),
];

fn python() -> String {
    std::env::var("RECAP_PYTHON").unwrap_or_else(|_| root().join(".venv/bin/python").display().to_string())
}

#[test]
fn an_image_folder_tree_becomes_an_evaluation_set() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    for (class, rgb) in [("red", [220u8, 40, 40]), ("blue", [40, 80, 220])] {
        std::fs::create_dir_all(tree.join(class)).unwrap();
        for k in 0..3u32 {
            let img = image::RgbImage::from_fn(128, 96, |x, y| {
                let (cx, cy) = (40 + 16 * k, 48);
                if x.abs_diff(cx) < 24 && y.abs_diff(cy) < 24 { image::Rgb(rgb) } else { image::Rgb([128, 128, 128]) }
            });
            img.save(tree.join(class).join(format!("{k}.png"))).unwrap();
        }
    }
    std::fs::write(tree.join("notes.txt"), "not a class folder").unwrap();
    let out = tmp.path().join("eval.parquet");
    let py = python();
    assert!(Path::new(&py).exists(), "no Python with pyarrow at {py}: run `bash scripts/python-env.sh` (scripts/test.sh does)");
    let run = std::process::Command::new(&py)
        .arg(root().join("tools/eval_from_folders.py"))
        .arg(&tree)
        .arg(&out)
        .args(["--task", "colour", "--template", "a {} square.", "--template", "a photo of a {} shape."])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let set = EvalSet::open(&out).unwrap();
    assert_eq!(set.spec.tasks[0].classes, ["blue", "red"]);
    assert_eq!(set.labels[0], [Some(0), Some(0), Some(0), Some(1), Some(1), Some(1)]);
    let opts = recap::models::SessionOptions { intra_threads: 1, ..Default::default() };
    let mut teacher = recap::models::Clip::load(&root().join("models/shapeworld-clip-a"), &opts).unwrap();
    let r = eval::evaluate(&mut teacher, &set, 4).unwrap();
    assert_eq!(r.zero_shot["colour"].n, 6);
    assert_eq!(r.zero_shot["colour"].top1, 1.0, "a red and a blue square: {r:?}");
    assert!(r.retrieval.is_none());
}

#[test]
fn a_file_that_is_not_an_evaluation_set_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = world(tmp.path(), 4, 1);
    // urls.parquet is Parquet, but not an evaluation set.
    recap::synth::write_url_list(tmp.path(), "http://127.0.0.1:1", &[], 0).unwrap();
    let e = EvalSet::open(&data.with_file_name("urls.parquet")).err().unwrap().to_string();
    assert!(e.contains("urls.parquet") && e.contains("no recap.eval metadata"), "{e}");
    // A directory (a run's shards, say) is named for what it is.
    let e = EvalSet::open(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("is a directory; expected one evaluation set file"), "{e}");
    let e = recap::train::dense::DenseSet::open(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("is a directory; expected one dense dataset file"), "{e}");
    let e = eval::load_model(&tmp.path().join("nothing")).err().unwrap().to_string();
    assert!(e.contains("no such directory"), "{e}");
}

#[test]
fn a_worlds_dense_set_holds_its_masks_and_depth() {
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path(), 12, 9);
    let set = recap::train::dense::DenseSet::open(&tmp.path().join("dense.parquet")).unwrap();
    assert_eq!(set.spec.classes, ["background", "circle", "square", "triangle", "diamond"]);
    assert_eq!(set.rows.len(), 10, "corrupt samples are left out");
    let samples: Vec<_> = recap::synth::load_samples(tmp.path()).unwrap().into_iter().filter(|s| !s.corrupt).collect();
    for (row, s) in set.rows.iter().zip(&samples) {
        assert_eq!(row.path, s.file);
        let (mask, depth) = (row.mask.as_ref().unwrap(), row.depth.as_ref().unwrap());
        // At the front object's centre: its class and its depth (metres); in a corner, mostly
        // the background wall at 10 m.
        let o = &s.objects[0];
        let scale = row.width as f32 / s.width as f32;
        let (x, y) = ((o.cx * scale) as usize, (o.cy * scale) as usize);
        let i = y * row.width as usize + x;
        let class = 1 + ["circle", "square", "triangle", "diamond"].iter().position(|k| *k == o.shape).unwrap() as u32;
        assert_eq!(mask[i], class, "{}", s.file);
        assert!((depth[i] - o.depth).abs() < 0.01, "{}: depth {} vs {}", s.file, depth[i], o.depth);
        assert!(mask.contains(&0) && depth.iter().any(|&d| (d - 10.0).abs() < 1e-3));
    }
}

#[test]
fn ade20k_and_nyu_style_folders_become_dense_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    for d in ["images", "annotations", "depth"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for k in 0..3u32 {
        image::RgbImage::from_pixel(8, 6, image::Rgb([10 * k as u8, 0, 0])).save(root.join(format!("images/{k:03}.png"))).unwrap();
        // ADE20K-style: 0 = other (ignored), 1..=2 classes.
        image::GrayImage::from_fn(8, 6, |x, _| image::Luma([(x % 3) as u8])).save(root.join(format!("annotations/{k:03}.png"))).unwrap();
        if k < 2 {
            image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_pixel(8, 6, image::Luma([1500 + k as u16])).save(root.join(format!("depth/{k:03}.png"))).unwrap();
        }
    }
    let out = tmp.path().join("dense.parquet");
    let convert = |extra: &[&str]| {
        std::process::Command::new(python())
            .arg(self::root().join("tools/dense_from_folders.py"))
            .arg(&root)
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let run = convert(&["--classes", "other,wall,floor", "--ignore-index", "0"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let set = recap::train::dense::DenseSet::open(&out).unwrap();
    assert_eq!(set.rows.len(), 3);
    assert_eq!(set.spec.ignore_index, Some(0));
    assert_eq!(set.rows[0].mask.as_ref().unwrap()[..4], [0, 1, 2, 0]);
    assert!((set.rows[1].depth.as_ref().unwrap()[0] - 1.501).abs() < 1e-6);
    assert!(set.rows[2].depth.is_none(), "an image without a depth map keeps a null depth");
    // Classes the masks use but the list does not declare: recap names the row.
    let run = convert(&["--classes", "other,wall"]);
    assert!(run.status.success());
    let e = recap::train::dense::DenseSet::open(&out).err().unwrap().to_string();
    assert!(e.contains("images/000.png") && e.contains("mask value 2 is not a class"), "{e}");
}

#[test]
fn dense_zero_shot_segmentation_counts_every_labelled_pixel() {
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path(), 10, 4);
    let out = std::process::Command::new(recap_bin())
        .args(["eval", "--dense", "--json", "--model", "models/shapeworld-clip-a", "--data"])
        .arg(tmp.path().join("dense.parquet"))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["images"], 8, "10 samples, 2 corrupt");
    assert_eq!(r["resolution"], 64, "clip-a's input size");
    let z = &r["zero_shot_segmentation"];
    let pixels: u64 = z["per_class"].as_object().unwrap().values().map(|c| c["pixels"].as_u64().unwrap()).sum();
    assert_eq!(pixels, 8 * 64 * 64, "every pixel of every labelled image is scored once");
    for k in ["miou", "pixel_accuracy", "mean_class_accuracy"] {
        assert!((0.0..=1.0).contains(&z[k].as_f64().unwrap()), "{k}: {z}");
    }
    // An ONNX-only directory cannot be read layer by layer.
    let e = recap::train::eval::evaluate_dense_zero_shot(
        &tmp.path().join("nothing"),
        &recap::train::dense::DenseSet::open(&tmp.path().join("dense.parquet")).unwrap(),
        &recap::train::eval::default_dense_templates(),
        8,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("model.safetensors + config.json"), "{e}");
}

#[test]
fn a_frozen_encoder_segmentation_head_fits_a_small_dense_set() {
    use recap::train::finetune::{self, FinetuneConfig};
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path(), 26, 12);
    let data = tmp.path().join("dense.parquet");
    let yaml = std::fs::read_to_string(root().join("pipelines/finetune-tiny.yaml")).unwrap();
    let run = |steps: u64, out: &str| {
        let cfg: FinetuneConfig = finetune::parse_str(
            &yaml,
            "finetune-tiny.yaml",
            &[
                format!("student={}", root().join("models/shapeworld-clip-a").display()),
                format!("data.train={}", data.display()),
                format!("data.eval={}", data.display()),
                format!("output.dir={}", tmp.path().join(out).display()),
                format!("train.steps={steps}"),
                "train.batch_size=8".into(),
                "optim.warmup_steps=5".into(),
                "optim.lr=3e-3".into(),
            ],
        )
        .unwrap();
        finetune::run(&cfg, "finetune-tiny.yaml", false, false).unwrap()
    };
    let first = run(1, "one");
    let last = run(80, "many");
    let (s1, s2) = (first.eval.unwrap().segmentation.unwrap(), last.eval.unwrap().segmentation.unwrap());
    assert!(last.final_loss < 0.6 * first.final_loss, "loss {} -> {}", first.final_loss, last.final_loss);
    assert!(s2.miou > s1.miou + 0.1, "mIoU {} -> {}", s1.miou, s2.miou);
    assert!(tmp.path().join("many/model/head.safetensors").is_file() && tmp.path().join("many/metrics.jsonl").is_file());
    // `recap eval --dense` measures the finetuned head as the run did, beside MaskCLIP.
    let out = std::process::Command::new(recap_bin())
        .args(["eval", "--dense", "--json", "--model"])
        .arg(tmp.path().join("many"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((r["head"]["segmentation"]["miou"].as_f64().unwrap() - s2.miou).abs() < 1e-9, "{r}");
    assert!(r["head"]["segmentation"]["per_class"].as_object().unwrap().len() >= 2, "{r}");
    assert!(r["zero_shot_segmentation"]["miou"].as_f64().is_some());
    // A dense set of other classes than the head's is refused, naming both.
    let ft = finetune::Finetuner::load(&tmp.path().join("many/model")).unwrap();
    let mut other = recap::train::dense::DenseSet::open(&data).unwrap();
    other.spec.classes.push("hexagon".into());
    let e = ft.evaluate_on(&other, 8).err().unwrap().to_string();
    assert!(e.contains("hexagon") && e.contains("the head was trained on"), "{e}");
    // A dense set that cannot be opened is reported at data.train, with its path.
    let e = finetune::run(
        &finetune::parse_str(&yaml, "f.yaml", &[format!("data.train={}", tmp.path().join("nope.parquet").display()), format!("student={}", root().join("models/shapeworld-clip-a").display())]).unwrap(),
        "f.yaml",
        false,
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("data.train") && e.contains("nope.parquet"), "{e}");
}

#[test]
fn a_resumed_finetune_continues_where_it_stopped() {
    use recap::train::finetune::{self, FinetuneConfig};
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path(), 12, 5);
    let data = tmp.path().join("dense.parquet");
    let yaml = std::fs::read_to_string(root().join("pipelines/finetune-tiny.yaml")).unwrap();
    let cfg = |out: &Path, extra: &[&str]| -> FinetuneConfig {
        let mut sets = vec![
            format!("student={}", root().join("models/shapeworld-clip-a").display()),
            format!("data.train={}", data.display()),
            format!("output.dir={}", out.display()),
            "task=depth".into(),
            "mode=full".into(),
            "train.steps=8".into(),
            "train.batch_size=4".into(),
            "train.log_every=1".into(),
            "train.checkpoint_every=4".into(),
            "train.keep_checkpoints=5".into(),
            "optim.warmup_steps=2".into(),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        finetune::parse_str(&yaml, "finetune-tiny.yaml", &sets).unwrap()
    };
    // Uninterrupted: 8 steps, checkpoints at 4 and 8.
    let whole = tmp.path().join("whole");
    let a = finetune::run(&cfg(&whole, &[]), "f.yaml", false, false).unwrap();
    // Stopped after step 4: the same directory without what came later.
    let cut = tmp.path().join("cut");
    copy_dir(&whole, &cut);
    std::fs::remove_dir_all(cut.join("checkpoints/step-00000008")).unwrap();
    std::fs::remove_dir_all(cut.join("model")).unwrap();
    // Without --resume the run is refused rather than overwritten.
    let e = finetune::run(&cfg(&cut, &[]), "f.yaml", false, false).err().unwrap().to_string();
    assert!(e.contains("already holds a run") && e.contains("--resume"), "{e}");
    // Another seed would draw other batches: refused.
    let e = finetune::run(&cfg(&cut, &["train.seed=7"]), "f.yaml", false, true).err().unwrap().to_string();
    assert!(e.contains("seed 0") && e.contains("differs"), "{e}");
    let b = finetune::run(&cfg(&cut, &[]), "f.yaml", false, true).unwrap();
    assert_eq!(b.resumed_from, Some(4));
    // The same batches and weights: the same losses after step 4, and the same final model.
    let losses = |dir: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    let (la, lb) = (losses(&whole), losses(&cut));
    assert_eq!(la.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    assert_eq!(la.iter().map(|x| x.0).collect::<Vec<_>>(), lb.iter().map(|x| x.0).collect::<Vec<_>>());
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "step {s}: {x} vs {y}");
    }
    assert!((a.final_loss - b.final_loss).abs() <= 1e-4 * a.final_loss.abs().max(1.0), "{} vs {}", a.final_loss, b.final_loss);
    let w = |dir: &Path| candle_core::safetensors::load(dir.join("model/head.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (wa, wb) = (w(&whole), w(&cut));
    for (k, t) in &wa {
        let d: f32 = (t - &wb[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-5, "{k}: {d}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_student_whose_patch_grid_does_not_fit_its_images_is_refused() {
    use recap::train::finetune;
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path(), 4, 3);
    let student = tmp.path().join("student");
    copy_dir(&root().join("models/shapeworld-clip-a"), &student);
    let cp = student.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    let patch = c["vision_config"]["patch_size"].as_u64().unwrap();
    c["vision_config"]["image_size"] = serde_json::json!(patch * 4 + patch / 2);
    std::fs::write(&cp, c.to_string()).unwrap();
    let yaml = std::fs::read_to_string(root().join("pipelines/finetune-tiny.yaml")).unwrap();
    let cfg = finetune::parse_str(
        &yaml,
        "f.yaml",
        &[format!("student={}", student.display()), format!("data.train={}", tmp.path().join("dense.parquet").display()), format!("output.dir={}", tmp.path().join("out").display())],
    )
    .unwrap();
    let e = finetune::run(&cfg, "f.yaml", false, false).err().unwrap().to_string();
    assert!(e.contains("student") && e.contains("config.json") && e.contains("patch grid does not fit"), "{e}");
}
