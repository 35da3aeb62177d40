//! The model stages on the project's fixture models (models/shapeworld-*), through ONNX Runtime:
//! generation equals Hugging Face generate(), embeddings equal onnxruntime-Python, the
//! augmentation replay equals its committed vectors, bad models are refused with a message that
//! names the file and the tensor, and a reinforced run keeps every row.
//! The reference vectors in tests/vectors/ come from tools/fixtures/references.py.

mod common;

use std::path::{Path, PathBuf};

use arrow::array::{Array, FixedSizeListArray, Float32Array, ListArray, StringArray};
use recap::augment::{self, AugmentSpec, ViewParams};
use recap::models::{Captioner, Clip, Decoding, EarlyStopping, GenerateOptions, SessionOptions};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vectors(name: &str) -> Value {
    let p = root().join("tests/vectors").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn load_rgb(rel: &str) -> image::RgbImage {
    image::open(root().join("tests/vectors").join(rel)).unwrap().to_rgb8()
}

fn opts() -> SessionOptions {
    SessionOptions { intra_threads: 1, ..Default::default() }
}

fn options_from(kwargs: &Value) -> GenerateOptions {
    let beams = kwargs["num_beams"].as_u64().unwrap_or(1) as usize;
    let decoding = if beams > 1 {
        Decoding::Beam {
            width: beams,
            length_penalty: kwargs["length_penalty"].as_f64().unwrap_or(1.0) as f32,
            early_stopping: if kwargs["early_stopping"].as_bool() == Some(true) { EarlyStopping::Finished } else { EarlyStopping::Heuristic },
        }
    } else {
        Decoding::Greedy
    };
    GenerateOptions {
        decoding,
        num_captions: kwargs["num_return_sequences"].as_u64().unwrap_or(1) as usize,
        max_new_tokens: kwargs["max_new_tokens"].as_u64().unwrap() as usize,
    }
}

#[test]
fn generation_equals_hugging_face_generate() {
    let v = vectors("captioner.json");
    let mut cap = Captioner::load(&root().join("models/shapeworld-captioner"), &opts()).unwrap();
    let images: Vec<image::RgbImage> = v["images"].as_array().unwrap().iter().map(|p| load_rgb(p.as_str().unwrap())).collect();
    let refs: Vec<&image::RgbImage> = images.iter().collect();
    for case in v["cases"].as_array().unwrap() {
        let o = options_from(&case["kwargs"]);
        let got = cap.generate(&refs, &[0; 4], &o).unwrap();
        let want: Vec<Vec<Vec<u32>>> = serde_json::from_value(case["tokens"].clone()).unwrap();
        assert_eq!(got, want, "case {}", case["name"]);
        let texts: Vec<Vec<String>> = serde_json::from_value(case["texts"].clone()).unwrap();
        for (row, t) in got.iter().zip(&texts) {
            for (ids, text) in row.iter().zip(t) {
                assert_eq!(&cap.decode(ids, false).unwrap(), text);
            }
        }
    }
    // The split decoder layout (decoder_model.onnx + decoder_with_past_model.onnx) gives the same.
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(root().join("models/shapeworld-captioner")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "decoder_model_merged.onnx" {
            std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    let mut split = Captioner::load(tmp.path(), &opts()).unwrap();
    let case = &v["cases"][1];
    let got = split.generate(&refs, &[0; 4], &options_from(&case["kwargs"])).unwrap();
    let want: Vec<Vec<Vec<u32>>> = serde_json::from_value(case["tokens"].clone()).unwrap();
    assert_eq!(got, want);
}

#[test]
fn sampling_is_reproducible_per_seed_and_rows_finish_independently() {
    let v = vectors("captioner.json");
    let mut cap = Captioner::load(&root().join("models/shapeworld-captioner"), &opts()).unwrap();
    let images: Vec<image::RgbImage> = v["images"].as_array().unwrap().iter().map(|p| load_rgb(p.as_str().unwrap())).collect();
    let refs: Vec<&image::RgbImage> = images.iter().collect();
    let o = GenerateOptions { decoding: Decoding::Sample { temperature: 1.0, top_k: 0, top_p: 0.9 }, num_captions: 5, max_new_tokens: 40 };
    let a = cap.generate(&refs, &[1, 2, 3, 4], &o).unwrap();
    let b = cap.generate(&refs, &[1, 2, 3, 4], &o).unwrap();
    assert_eq!(a, b);
    // One image alone gets the same captions as in the batch: rows do not depend on each other.
    let alone = cap.generate(&refs[2..3], &[3], &o).unwrap();
    assert_eq!(alone[0], a[2]);
    assert_eq!(a.len(), 4);
    assert!(a.iter().all(|r| r.len() == 5));
    let c = cap.generate(&refs, &[9, 9, 9, 9], &o).unwrap();
    assert_ne!(a, c, "different seeds should give different samples");
}

#[test]
fn clip_embeddings_equal_onnxruntime_python() {
    let v = vectors("clip.json");
    for (name, m) in v["models"].as_object().unwrap() {
        let mut clip = Clip::load(&root().join("models").join(name), &opts()).unwrap();
        let images: Vec<image::RgbImage> = m["images"].as_array().unwrap().iter().map(|p| load_rgb(p.as_str().unwrap())).collect();
        let refs: Vec<&image::RgbImage> = images.iter().collect();
        let got = clip.embed_images(&refs).unwrap();
        let want: Vec<f32> = m["image_embeds"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max < 1e-4, "{name}: image embeddings differ by up to {max}");
        let texts: Vec<&str> = m["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let ids: Vec<Vec<u32>> = serde_json::from_value(m["input_ids"].clone()).unwrap();
        for (t, want_ids) in texts.iter().zip(&ids) {
            let enc = clip.tokenizer.inner.encode(*t, true).unwrap();
            assert_eq!(enc.get_ids(), want_ids.as_slice(), "{name}: tokens of {t:?}");
        }
        let got = clip.embed_texts(&texts).unwrap();
        let want: Vec<f32> = m["text_embeds"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32)).collect();
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max < 1e-4, "{name}: text embeddings differ by up to {max}");
    }
}

#[test]
fn preprocessing_follows_the_hugging_face_processors() {
    let v = vectors("preprocess.json");
    let img = load_rgb(v["image"].as_str().unwrap());
    for (name, m) in v["models"].as_object().unwrap() {
        let p = recap::models::hf::ImageProcessor::from_file(&root().join("models").join(name).join("preprocessor_config.json")).unwrap();
        let mut got = Vec::new();
        p.process_into(&img, &mut got).unwrap();
        let want: Vec<f32> = m["pixel_values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let mean = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).sum::<f32>() / got.len() as f32;
        // Resampling is PIL's in Python and fast_image_resize's here: a level or two apart at most.
        assert!(mean < 0.02, "{name}: pixel values differ by {mean} on average");
    }
}

#[test]
fn a_model_with_the_wrong_inputs_is_refused_with_the_file_and_tensor_named() {
    let tmp = tempfile::tempdir().unwrap();
    let clip_dir = root().join("models/shapeworld-clip-a");
    for f in ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        if clip_dir.join(f).exists() {
            std::fs::copy(clip_dir.join(f), tmp.path().join(f)).unwrap();
        }
    }
    // A captioner's encoder where a CLIP is expected.
    std::fs::copy(root().join("models/shapeworld-captioner/encoder_model.onnx"), tmp.path().join("model.onnx")).unwrap();
    let err = Clip::load(tmp.path(), &opts()).err().expect("must be refused").to_string();
    assert!(err.contains("model.onnx"), "{err}");
    assert!(err.contains("input `input_ids`"), "{err}");
    assert!(err.contains("output `image_embeds`"), "{err}");
    // A captioner directory without a decoder.
    let tmp2 = tempfile::tempdir().unwrap();
    for f in ["config.json", "preprocessor_config.json", "tokenizer.json", "generation_config.json", "encoder_model.onnx"] {
        std::fs::copy(root().join("models/shapeworld-captioner").join(f), tmp2.path().join(f)).unwrap();
    }
    let err = Captioner::load(tmp2.path(), &opts()).err().expect("must be refused").to_string();
    assert!(err.contains("decoder_model_merged.onnx"), "{err}");
    // Not an ONNX file at all.
    std::fs::write(tmp2.path().join("decoder_model_merged.onnx"), b"not onnx").unwrap();
    let err = Captioner::load(tmp2.path(), &opts()).err().expect("must be refused").to_string();
    assert!(err.contains("decoder_model_merged.onnx") && err.contains("cannot load"), "{err}");
}

/// Parameters -> SHA-256 of the view's pixels, for a fixed image; `RECAP_BLESS=1` rewrites the file.
#[test]
fn augmentation_replay_matches_its_vectors() {
    let img = load_rgb("images/00_64.png");
    let spec = AugmentSpec::default();
    let mut cases = Vec::new();
    let mut params: Vec<ViewParams> = (0..12).map(|v| augment::draw(&mut augment::rng_for("00112233445566778899aabbccddeeff", v, 0), 64, 64, &spec)).collect();
    // Every op at least once, with both signs where it has one.
    for (i, op) in augment::OPS.iter().enumerate() {
        let value = match *op {
            "Posterize" => 5.0,
            "Solarize" => 128.0,
            "ShearX" | "ShearY" => 0.2,
            "TranslateX" | "TranslateY" => -0.2,
            "Rotate" => 20.0,
            _ => if i % 2 == 0 { 0.5 } else { -0.5 },
        };
        params.push(ViewParams { crop_x: 4, crop_y: 2, crop_w: 50, crop_h: 60, flip: i % 2 == 1, ops: vec![augment::Op { op: op.to_string(), value }] });
    }
    for p in &params {
        let view = augment::render(&img, p, 48).unwrap();
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(view.as_raw()))
        };
        cases.push(serde_json::json!({ "params": p, "size": 48, "sha256": sha }));
    }
    let path = root().join("tests/vectors/augment.json");
    let got = serde_json::json!({ "spec": augment::SPEC_VERSION, "image": "images/00_64.png", "cases": cases });
    if std::env::var_os("RECAP_BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
    }
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(got, want, "the augmentation replay changed: bump augment::SPEC_VERSION and rerun with RECAP_BLESS=1");
}

/// Put model-stage sections (YAML) into a pipeline file, before its `output:`.
fn add_stages(pipeline: &Path, stages: &str) {
    let text = std::fs::read_to_string(pipeline).unwrap().replace("output:", &format!("{stages}output:"));
    std::fs::write(pipeline, text).unwrap();
}

fn list_lens(b: &arrow::array::RecordBatch, col: &str) -> Vec<Option<usize>> {
    let a = b.column_by_name(col).unwrap_or_else(|| panic!("no column {col}")).as_any().downcast_ref::<ListArray>().unwrap();
    (0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).len())).collect()
}

/// A shard is encoded 128 rows at a time, each slice's embeddings, captions and images dropped once
/// its batch has them: a reinforced shard of 140 rows (two slices) holds, row for row and column
/// for column, what shards of 20 rows hold (views and captions are seeded by the row's uid, and
/// the stored embeddings are the same bits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinforced_shard_written_in_slices_holds_what_small_shards_hold() {
    let w = common::world(140, 2, "404=3", recap::synth::ServeOptions::default()).await;
    let models = root().join("models");
    let extra = format!(
        r#"caption:
  model: {m}/shapeworld-captioner
  num_captions: 2
  max_new_tokens: 20
  batch_size: 16
  intra_threads: 1
score:
  teachers: [{m}/shapeworld-clip-a, {m}/shapeworld-clip-b]
  augmentations: 1
  batch_size: 32
  intra_threads: 1
filter:
  min_alt_score: 0.3
"#,
        m = models.display()
    );
    let mut tables = Vec::new();
    for (name, rps) in [("big", 140), ("small", 20)] {
        let out = w.tmp.path().join(name);
        let p = common::pipeline(&w, &out, rps, "", "");
        add_stages(&p, &extra);
        recap::engine::run(&recap::config::load(&p, &[]).unwrap(), &Default::default()).await.unwrap();
        let shards: Vec<_> = common::read_all(&out).into_iter().map(|(_, b)| b).collect();
        assert_eq!(shards.len(), if rps == 140 { 1 } else { 7 });
        tables.push(arrow::compute::concat_batches(&shards[0].schema(), &shards).unwrap());
    }
    let (big, small) = (&tables[0], &tables[1]);
    assert_eq!((big.num_rows(), small.num_rows()), (140, 140));
    let status = common::strings(big, "status");
    let late_ok = (128..140).filter(|&i| status[i].as_deref() == Some("ok")).count();
    assert!(late_ok > 0 && status.iter().filter(|s| s.as_deref() == Some("ok")).count() > 60, "{status:?}");
    for (i, field) in big.schema().fields().iter().enumerate() {
        let name = field.name();
        if name == "key" {
            continue; // numbered by shard
        }
        let (a, b) = if name == "image" {
            // image.path carries the key; the bytes must be the same.
            let col = |t: &arrow::array::RecordBatch| t.column(i).as_any().downcast_ref::<arrow::array::StructArray>().unwrap().column(0).clone();
            (col(big), col(small))
        } else {
            (big.column(i).clone(), small.column(i).clone())
        };
        assert_eq!(small.schema().field(i).name(), name);
        for r in 0..140 {
            assert!(a.slice(r, 1).to_data() == b.slice(r, 1).to_data(), "row {r}, column {name}: {:?} vs {:?}", a.slice(r, 1), b.slice(r, 1));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reinforced_run_keeps_every_row_and_writes_the_layout() {
    let w = common::world(24, 1, "404=2", recap::synth::ServeOptions::default()).await;
    let out = w.tmp.path().join("shards");
    let p = common::pipeline(&w, &out, 10, "", "");
    let models = root().join("models");
    let extra = format!(
        r#"caption:
  model: {m}/shapeworld-captioner
  num_captions: 3
  max_new_tokens: 30
  batch_size: 8
  intra_threads: 1
score:
  teachers: [{m}/shapeworld-clip-a, {m}/shapeworld-clip-b]
  augmentations: 2
  batch_size: 16
  intra_threads: 1
filter:
  min_alt_score: 0.0
"#,
        m = models.display()
    );
    add_stages(&p, &extra);
    let plan = recap::config::load(&p, &[]).unwrap();
    let summary = recap::engine::run(&plan, &Default::default()).await.unwrap();
    assert_eq!(summary.rows, 24);
    let shards = common::read_all(&out);
    assert_eq!(shards.iter().map(|(_, b)| b.num_rows()).sum::<usize>(), 24, "rows in == rows out");
    let mut ok = 0;
    let mut filtered = 0;
    for (_, b) in &shards {
        let status = common::strings(b, "status");
        let caps = list_lens(b, "synthetic_captions");
        let views = list_lens(b, "augmentations");
        let img = list_lens(b, "image_embeddings");
        let txt = list_lens(b, "text_embeddings");
        let syn = list_lens(b, "synthetic_clip_scores");
        let score = b.column_by_name("clip_score").unwrap().as_any().downcast_ref::<Float32Array>().unwrap().clone();
        let emb = b.column_by_name("image_embeddings").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
        let arrow::datatypes::DataType::FixedSizeList(_, d) = emb.values().data_type() else { panic!("not fixed size") };
        assert_eq!(*d, 64 + 48, "teacher dims concatenated");
        let _ = emb.values().as_any().downcast_ref::<FixedSizeListArray>().unwrap();
        for i in 0..b.num_rows() {
            match status[i].as_deref().unwrap() {
                "ok" => {
                    ok += 1;
                    assert_eq!(caps[i], Some(3));
                    assert_eq!(views[i], Some(3));
                    assert_eq!(img[i], Some(3));
                    assert_eq!(txt[i], Some(4));
                    assert_eq!(syn[i], Some(3));
                    assert!(score.is_valid(i) && score.value(i) >= 0.0);
                }
                "filtered" => {
                    filtered += 1;
                    assert!(score.is_valid(i) && score.value(i) < 0.0);
                    assert_eq!(img[i], None, "filtered rows keep no embeddings");
                }
                _ => {
                    assert_eq!(caps[i], None);
                    assert_eq!(img[i], None);
                    assert!(!score.is_valid(i));
                }
            }
        }
    }
    assert!(ok > 0, "some rows must be ok");
    let _ = filtered;
    // File metadata names the teachers and their dims.
    let file = std::fs::File::open(out.join("00000.parquet")).unwrap();
    let meta = parquet::file::reader::FileReader::metadata(&parquet::file::reader::SerializedFileReader::new(file).unwrap()).file_metadata().key_value_metadata().cloned().unwrap();
    let get = |k: &str| meta.iter().find(|kv| kv.key == k).and_then(|kv| kv.value.clone());
    assert!(get("recap.teachers").unwrap().contains("\"dim\":64"));
    assert_eq!(get("recap.embedding_dim").as_deref(), Some("112"));
    assert_eq!(get("recap.augment_spec").as_deref(), Some(augment::SPEC_VERSION));

    // pyarrow reads the embeddings as float16, each teacher's part has unit norm, and the
    // stored clip_score is what the stored embeddings give.
    let python = std::env::var("RECAP_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    assert!(Path::new(&python).exists(), "no Python with pyarrow at {python}: run `bash scripts/python-env.sh` (scripts/test.sh does)");
    let output = std::process::Command::new(&python).arg("tests/interop/reinforced.py").arg(&out).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let v: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(v["rows"], 24);
    assert_eq!(v["ok"], ok);
    assert!(v["max_norm_err"].as_f64().unwrap() < 5e-3, "{v}");
    assert!(v["max_score_err"].as_f64().unwrap() < 5e-3, "{v}");

    // The tools users already have: pyarrow, DuckDB, polars and Hugging Face `datasets` open the
    // same shards and agree on rows per status, on one decoded image and on its embedding.
    let output = std::process::Command::new(&python).arg("tests/interop/tools.py").arg(&out).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let t: Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut want = std::collections::BTreeMap::new();
    for f in std::fs::read_dir(&out).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "parquet")) {
        let (b, _) = recap::sink::read_shard(&f).unwrap();
        let st = b.column_by_name("status").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
        for i in 0..st.len() {
            *want.entry(st.value(i).to_string()).or_insert(0u64) += 1;
        }
    }
    let want = serde_json::to_value(&want).unwrap();
    for tool in ["pyarrow", "duckdb", "polars", "datasets"] {
        assert_eq!(t["counts"][tool], want, "{tool}: {t}");
        assert_eq!(t["embedding"][tool], t["embedding"]["pyarrow"], "{tool}: {t}");
    }
    assert_eq!(t["datasets_image_type"], "PIL.JpegImagePlugin.JpegImageFile", "{t}");
    assert_eq!(t["datasets_features"]["image"], "Image(mode=None, decode=True)", "{t}");
    assert_eq!(t["datasets_features"]["image_embeddings"], "List(List(Value('float16'), length=112))", "{t}");
    assert!(t["datasets_captions"].as_array().unwrap().iter().all(|c| c.is_string()), "{t}");
    assert!(t["pyarrow_metadata_keys"].as_array().unwrap().iter().any(|k| k == "huggingface"), "{t}");
    assert!(t["duckdb_cosine"].as_f64().unwrap().abs() < 5e-3, "{t}");
    // The same image decoded here (zune-jpeg) and by PIL (libjpeg): same size, same mean pixel
    // within rounding differences of the two IDCTs.
    let key = t["first_ok_key"].as_str().unwrap();
    let r = recap::query::run_sql(&out, &format!("SELECT image['bytes'] AS b FROM shards WHERE key = '{key}'")).await.unwrap();
    let bytes = r[0].column(0).as_any().downcast_ref::<arrow::array::BinaryArray>().unwrap().value(0).to_vec();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let mean = img.as_raw().iter().map(|&x| x as f64).sum::<f64>() / img.as_raw().len() as f64;
    let first = t["image"]["pyarrow+PIL"].clone();
    assert_eq!(first["size"], serde_json::json!([img.width(), img.height()]));
    for tool in ["duckdb+PIL", "polars+PIL", "datasets"] {
        assert_eq!(t["image"][tool], first, "{tool}: {t}");
    }
    assert!((first["mean"].as_f64().unwrap() - mean).abs() < 0.5, "PIL mean {} vs {mean}", first["mean"]);
}

#[test]
fn models_that_do_not_exist_fail_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let urls = tmp.path().join("urls.csv");
    std::fs::write(&urls, "url,caption\nhttp://example.org/a.jpg,a\n").unwrap();
    let p = tmp.path().join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "input:\n  path: {}\ncaption:\n  model: {}/nope\n  decoding: greedy\n  num_captions: 2\nfilter:\n  min_alt_score: 0.2\noutput:\n  path: {}/out\n",
            urls.display(),
            tmp.path().display(),
            tmp.path().display()
        ),
    )
    .unwrap();
    let err = recap::config::load(&p, &[]).err().unwrap().to_string();
    assert!(err.contains("caption.model"), "{err}");
    assert!(err.contains("caption.num_captions"), "{err}");
    assert!(err.contains("filter.min_alt_score: needs CLIP scores"), "{err}");
}

#[test]
fn validate_reports_every_broken_model_with_its_yaml_path() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::write(t.join("urls.csv"), "link,text\nhttp://example.org/a.jpg,a\n").unwrap();
    // A teacher without its preprocessor config, a captioner without a decoder, one good teacher.
    let copy = |from: &str, to: &str, skip: &[&str]| {
        std::fs::create_dir_all(t.join(to)).unwrap();
        for e in std::fs::read_dir(root().join("models").join(from)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if !skip.iter().any(|s| name.starts_with(s)) {
                std::fs::copy(e.path(), t.join(to).join(name)).unwrap();
            }
        }
    };
    copy("shapeworld-clip-a", "clip", &["preprocessor_config.json"]);
    copy("shapeworld-captioner", "cap", &["decoder_model"]);
    let good = root().join("models/shapeworld-clip-b");
    let p = t.join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "input:\n  path: {t}/urls.csv\ncaption:\n  model: {t}/cap\nscore:\n  teachers: [{good}, {t}/clip]\noutput:\n  path: {t}/out\n",
            t = t.display(),
            good = good.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_recap")).arg("validate").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // The input's problems and every model's, at once, each at its path.
    assert!(err.contains("4 problems found"), "{err}");
    assert!(err.contains("input.url_column: no column \"url\""), "{err}");
    assert!(err.contains("caption.model: model ") && err.contains("decoder_model_merged.onnx"), "{err}");
    assert!(err.contains("score.teachers[1]: model ") && err.contains("preprocessor_config.json is missing"), "{err}");
    assert!(!err.contains("score.teachers[0]"), "{err}");
}

#[test]
fn cuda_without_the_gpu_library_is_a_clear_error() {
    // `scripts/fetch-ort.sh` fetches the CPU build of ONNX Runtime, which has no CUDA provider;
    // `--gpu` the onnxruntime-gpu build, which still needs an NVIDIA driver. Either way, on a
    // machine without a GPU the error says exactly what is missing.
    if std::env::var_os("ORT_DYLIB_PATH").is_some() || std::path::Path::new("/dev/nvidia0").exists() {
        return; // a GPU may be there
    }
    let o = SessionOptions { device: recap::models::Device::Cuda(0), intra_threads: 1 };
    let err = Clip::load(&root().join("models/shapeworld-clip-a"), &o).err().expect("no GPU here").to_string();
    let lib = recap::models::runtime::library_path().unwrap();
    if lib.parent().unwrap().join("libonnxruntime_providers_cuda.so").is_file() {
        assert!(err.contains("libcuda.so.1 cannot be loaded") && err.contains("no usable NVIDIA GPU"), "{err}");
    } else {
        assert!(err.contains("is the CPU build of ONNX Runtime") && err.contains("fetch-ort.sh --gpu"), "{err}");
    }
    assert!(err.contains("device: cpu"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_reinforces_recovered_rows_and_keeps_the_others() {
    let w = common::world(20, 0, "flaky=3", recap::synth::ServeOptions::default()).await;
    let out = w.tmp.path().join("shards");
    let p = common::pipeline(&w, &out, 10, "", "");
    let m = root().join("models");
    let extra = format!(
        "caption:\n  model: {m}/shapeworld-captioner\n  num_captions: 2\n  max_new_tokens: 20\n  intra_threads: 1\nscore:\n  teachers: [{m}/shapeworld-clip-a]\n  augmentations: 1\n  intra_threads: 1\n",
        m = m.display()
    );
    add_stages(&p, &extra);
    let plan = recap::config::load(&p, &["download.retries=0".into()]).unwrap();
    let first = recap::engine::run(&plan, &Default::default()).await.unwrap();
    assert_eq!(first.status.get("http_error"), Some(&3));
    let captions_before: Vec<Vec<Option<usize>>> = common::read_all(&out).iter().map(|(_, b)| list_lens(b, "synthetic_captions")).collect();
    let texts_before: Vec<Vec<Option<String>>> = common::read_all(&out).iter().map(|(_, b)| first_captions(b)).collect();
    let retried = recap::engine::run(&plan, &recap::engine::RunOptions { retry_failed: true, ..Default::default() }).await.unwrap();
    assert_eq!(retried.rows_recovered, 3);
    for (s, (_, b)) in common::read_all(&out).iter().enumerate() {
        let status = common::strings(b, "status");
        let caps = list_lens(b, "synthetic_captions");
        let texts = first_captions(b);
        for i in 0..b.num_rows() {
            assert_eq!(status[i].as_deref(), Some("ok"));
            assert_eq!(caps[i], Some(2), "every ok row is reinforced, recovered ones too");
            if captions_before[s][i].is_some() {
                assert_eq!(texts[i], texts_before[s][i], "rows kept get the same (seeded) captions");
            }
        }
    }
}

fn first_captions(b: &arrow::array::RecordBatch) -> Vec<Option<String>> {
    let a = b.column_by_name("synthetic_captions").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
    (0..a.len())
        .map(|i| {
            a.is_valid(i).then(|| {
                let v = a.value(i);
                v.as_any().downcast_ref::<arrow::array::StringArray>().unwrap().value(0).to_string()
            })
        })
        .collect()
}
