//! `recap eval`: zero-shot classification with prompt ensembles and image↔text retrieval on a
//! labelled evaluation set, for a trained student (candle) or any ONNX CLIP (the teachers), by
//! one code path.
//!
//! The evaluation set is one Parquet file:
//! - `image`: struct {bytes, path} (as in shards; the layout Hugging Face `datasets` reads),
//! - one nullable int32 column per label task (the class index; null where the task does not
//!   apply to the image),
//! - optionally `caption` (utf8) for retrieval,
//! - file metadata `recap.eval`: `{"version": 1, "tasks": [{"name", "classes": [...],
//!   "templates": ["a photo of a {}.", ...]}], "caption_column": "caption"}`.
//!
//! Zero-shot follows CLIP: each class's prompts (every template filled with the class name) are
//! embedded, L2-normalised, averaged and normalised again; an image takes the class whose
//! classifier has the highest cosine.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, Int32Array, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use arrow::record_batch::RecordBatch;
use candle_core::{Device, Tensor};
use image::RgbImage;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::model::{ce, l2_normalize, Clip as Student, ClipShape};
use crate::error::{Error, Result};
use crate::models::hf::{ImageProcessor, TextTokenizer};
use crate::models::{Clip as OnnxClip, SessionOptions};

/// One classification task of an evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub classes: Vec<String>,
    /// Prompt templates with `{}` where the class name goes.
    pub templates: Vec<String>,
}

/// The `recap.eval` metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSpec {
    pub version: u32,
    pub tasks: Vec<TaskSpec>,
    #[serde(default)]
    pub caption_column: Option<String>,
}

/// An evaluation set in memory (they are small: thousands of images).
pub struct EvalSet {
    pub path: PathBuf,
    pub spec: EvalSpec,
    pub images: Vec<Vec<u8>>,
    /// Per task, per image.
    pub labels: Vec<Vec<Option<u32>>>,
    pub captions: Option<Vec<Option<String>>>,
}

fn bad(path: &Path, m: impl Into<String>) -> Error {
    Error::input(path, m.into())
}

/// A recap metadata entry (`recap.eval`, `recap.dense`) of a Parquet file: in the Arrow schema's
/// metadata (where recap and pyarrow write it) or else in the footer's key-value metadata.
pub(crate) fn file_metadata(b: &ParquetRecordBatchReaderBuilder<File>, key: &str) -> Option<String> {
    b.schema().metadata().get(key).cloned().or_else(|| {
        let kv = b.metadata().file_metadata().key_value_metadata()?;
        kv.iter().find(|k| k.key == key).and_then(|k| k.value.clone())
    })
}

/// The `image` column of evaluation and dense sets: struct {bytes, path}.
pub(crate) fn image_column<'a>(images: impl Iterator<Item = (&'a [u8], &'a str)> + Clone) -> Result<(Field, ArrayRef)> {
    let fields = Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)]);
    let column = StructArray::try_new(
        fields.clone(),
        vec![
            Arc::new(images.clone().map(|(b, _)| Some(b)).collect::<BinaryArray>()),
            Arc::new(images.map(|(_, p)| Some(p)).collect::<StringArray>()),
        ],
        None,
    )
    .map_err(|e| Error::data("image column", e))?;
    Ok((Field::new("image", DataType::Struct(fields), false), Arc::new(column)))
}

/// Write one batch with `key` = `spec` (JSON) in the Arrow schema's metadata, which the writer also
/// puts in the file's key-value metadata (pyarrow shows it as `schema.metadata`, other readers
/// find it in the footer); written to a temporary name and renamed into place.
pub(crate) fn write_labelled(path: &Path, key: &str, spec: &impl Serialize, fields: Vec<Field>, cols: Vec<ArrayRef>) -> Result<()> {
    let meta = std::collections::HashMap::from([(key.to_string(), serde_json::to_string(spec).expect("spec serialises"))]);
    let schema = Arc::new(Schema::new_with_metadata(fields, meta));
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| Error::data(key.to_string(), e))?;
    let tmp = path.with_extension("parquet.tmp");
    let f = File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    let mut w = ArrowWriter::try_new(f, schema, Some(WriterProperties::builder().build())).map_err(|e| Error::data(format!("{key} writer"), e))?;
    w.write(&batch).map_err(|e| Error::data(format!("writing {}", path.display()), e))?;
    w.close().map_err(|e| Error::data(format!("closing {}", path.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("cannot move into place", path, e))
}

impl EvalSet {
    pub fn open(path: &Path) -> Result<EvalSet> {
        // A URL (s3://, gs://, az://, https://): the file is read from a local copy.
        let named = path;
        let local = crate::storage::local_file(path)?;
        let path = local.as_ref();
        if path.is_dir() {
            return Err(bad(path, "is a directory; expected one evaluation set file, as `recap synth` writes it (WORLD/eval.parquet) or tools/eval_from_folders.py makes from folders"));
        }
        let file = File::open(path).map_err(|e| Error::io("cannot open evaluation set", path, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| bad(path, format!("not a readable Parquet file: {e}")))?;
        let raw = file_metadata(&b, "recap.eval")
            .ok_or_else(|| bad(path, "has no recap.eval metadata; expected an evaluation set as `recap synth` or tools/eval_from_folders.py writes it (see README: Evaluation sets)"))?;
        let spec: EvalSpec = serde_json::from_str(&raw).map_err(|e| bad(path, format!("recap.eval metadata is not valid: {e}")))?;
        let schema = b.schema().clone();
        if schema.field_with_name("image").is_err() {
            return Err(bad(path, "lacks the image column (struct {bytes, path})"));
        }
        for t in &spec.tasks {
            if schema.field_with_name(&t.name).is_err() {
                return Err(bad(path, format!("recap.eval names task {:?} but the file has no such column", t.name)));
            }
            if t.classes.len() < 2 || t.templates.is_empty() || t.templates.iter().any(|x| !x.contains("{}")) {
                return Err(bad(path, format!("task {:?}: expected at least 2 classes and templates that each hold {{}}", t.name)));
            }
        }
        let reader = b.build().map_err(|e| bad(path, e.to_string()))?;
        let mut set = EvalSet {
            path: named.to_path_buf(),
            images: Vec::new(),
            labels: vec![Vec::new(); spec.tasks.len()],
            captions: spec.caption_column.as_ref().map(|_| Vec::new()),
            spec,
        };
        for batch in reader {
            let batch = batch.map_err(|e| bad(path, format!("cannot read: {e}")))?;
            let img = batch.column_by_name("image").and_then(|c| c.as_any().downcast_ref::<StructArray>()).ok_or_else(|| bad(path, "image is not a struct"))?;
            let bytes = img.column_by_name("bytes").and_then(|c| c.as_any().downcast_ref::<BinaryArray>()).ok_or_else(|| bad(path, "image.bytes is not binary"))?;
            for i in 0..batch.num_rows() {
                if bytes.is_null(i) {
                    return Err(bad(path, format!("row {} has no image bytes", set.images.len())));
                }
                set.images.push(bytes.value(i).to_vec());
            }
            for (k, t) in set.spec.tasks.iter().enumerate() {
                let c = batch.column_by_name(&t.name).expect("checked");
                let c = arrow::compute::cast(c, &DataType::Int32).map_err(|e| bad(path, format!("task column {}: {e}", t.name)))?;
                let c = c.as_any().downcast_ref::<Int32Array>().expect("cast to int32");
                for i in 0..c.len() {
                    let v = (!c.is_null(i)).then(|| c.value(i));
                    if let Some(v) = v {
                        if v < 0 || v as usize >= t.classes.len() {
                            return Err(bad(path, format!("task {}: label {v} is not a class index (0..{})", t.name, t.classes.len())));
                        }
                    }
                    set.labels[k].push(v.map(|v| v as u32));
                }
            }
            if let (Some(col), Some(caps)) = (&set.spec.caption_column, &mut set.captions) {
                let c = batch.column_by_name(col).and_then(|c| c.as_any().downcast_ref::<StringArray>()).ok_or_else(|| bad(path, format!("caption column {col} is missing or not utf8")))?;
                caps.extend((0..c.len()).map(|i| (!c.is_null(i)).then(|| c.value(i).to_string())));
            }
        }
        if set.images.is_empty() {
            return Err(bad(path, "has no rows"));
        }
        Ok(set)
    }
}

/// Write an evaluation set: images (encoded bytes, path), per-task labels, optional captions.
pub fn write_eval_set(path: &Path, spec: &EvalSpec, images: &[(Vec<u8>, String)], labels: &[Vec<Option<u32>>], captions: Option<&[Option<String>]>) -> Result<()> {
    let (image, column) = image_column(images.iter().map(|(b, p)| (b.as_slice(), p.as_str())))?;
    let mut fields = vec![image];
    let mut cols: Vec<ArrayRef> = vec![column];
    for (t, l) in spec.tasks.iter().zip(labels) {
        fields.push(Field::new(&t.name, DataType::Int32, true));
        cols.push(Arc::new(l.iter().map(|v| v.map(|x| x as i32)).collect::<Int32Array>()));
    }
    if let (Some(name), Some(c)) = (&spec.caption_column, captions) {
        fields.push(Field::new(name, DataType::Utf8, true));
        cols.push(Arc::new(c.iter().map(|v| v.as_deref()).collect::<StringArray>()));
    }
    write_labelled(path, "recap.eval", spec, fields, cols)
}

/// Something that embeds images and texts into one space (L2-normalised rows).
pub trait Embedder {
    fn name(&self) -> String;
    fn embed_images(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>>;
    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}

/// A trained student, with the processor and tokenizer its directory holds.
pub struct StudentModel {
    pub dir: PathBuf,
    pub clip: Student,
    pub processor: ImageProcessor,
    pub tokenizer: TextTokenizer,
}

impl StudentModel {
    /// A model directory as `recap train` writes it (`model/` of a run).
    pub fn load(dir: &Path) -> Result<StudentModel> {
        let shape = ClipShape::from_hf_config(&dir.join("config.json"))?;
        let mut clip = Student::load(&shape, &dir.join("model.safetensors"), &Device::Cpu)?;
        // Evaluation needs no gradients: the forward records nothing.
        clip.params.frozen = true;
        let processor = ImageProcessor::from_file(&dir.join("preprocessor_config.json"))?;
        let tokenizer = TextTokenizer::load(dir, shape.text.context_length)?;
        Ok(StudentModel { dir: dir.to_path_buf(), clip, processor, tokenizer })
    }
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    t.to_vec2().map_err(ce("embeddings"))
}

/// Normalised image embeddings of a candle student.
pub fn student_images(clip: &Student, processor: &ImageProcessor, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
    let s = clip.shape.vision.image_size;
    let refs: Vec<&RgbImage> = images.iter().collect();
    let px = processor.batch(&refs, (s as u32, s as u32)).map_err(|e| Error::Internal(format!("student preprocessing: {e}")))?;
    let px = Tensor::from_vec(px, (images.len(), 3, s, s), &clip.device).map_err(ce("pixels"))?;
    rows(&l2_normalize(&clip.encode_image(&px)?)?)
}

/// Normalised text embeddings of a candle student, pooled at each text's first eos.
pub fn student_texts(clip: &Student, tokenizer: &TextTokenizer, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (ids, mask, len) = tokenizer.batch(&refs).map_err(|e| Error::Internal(format!("tokenising: {e}")))?;
    let eos = clip.shape.eos_token_id;
    let pool: Vec<u32> = (0..texts.len())
        .map(|r| {
            let valid = mask[r * len..(r + 1) * len].iter().filter(|m| **m == 1).count().max(1);
            eos.and_then(|e| ids[r * len..r * len + valid].iter().position(|&t| t == e as i64)).unwrap_or(valid - 1) as u32
        })
        .collect();
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let ids = Tensor::from_vec(ids, (texts.len(), len), &clip.device).map_err(ce("ids"))?;
    rows(&l2_normalize(&clip.encode_text(&ids, &pool)?)?)
}

impl Embedder for StudentModel {
    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    fn embed_images(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        student_images(&self.clip, &self.processor, images)
    }

    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        student_texts(&self.clip, &self.tokenizer, texts)
    }
}

/// The student being trained, borrowed for an evaluation between steps.
pub struct LiveStudent<'a> {
    pub clip: &'a Student,
    pub processor: &'a ImageProcessor,
    pub tokenizer: &'a TextTokenizer,
}

impl Embedder for LiveStudent<'_> {
    fn name(&self) -> String {
        "the student in training".into()
    }

    fn embed_images(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        student_images(self.clip, self.processor, images)
    }

    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        student_texts(self.clip, self.tokenizer, texts)
    }
}

impl Embedder for OnnxClip {
    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    fn embed_images(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let refs: Vec<&RgbImage> = images.iter().collect();
        let v = OnnxClip::embed_images(self, &refs).map_err(|e| Error::model(&self.dir, e))?;
        Ok(v.chunks(self.dim).map(<[f32]>::to_vec).collect())
    }

    fn embed_texts(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let v = OnnxClip::embed_texts(self, &refs).map_err(|e| Error::model(&self.dir, e))?;
        Ok(v.chunks(self.dim).map(<[f32]>::to_vec).collect())
    }
}

/// The model directory a `--model` value names: a run directory's `model/`, or itself.
fn model_dir(path: &Path) -> PathBuf {
    if path.join("model").join("model.safetensors").is_file() {
        path.join("model")
    } else {
        path.to_path_buf()
    }
}

fn has_onnx(dir: &Path) -> bool {
    std::iter::once("model.onnx").chain(crate::models::clip::IMAGE_TOWER_FILES).any(|f| dir.join(f).is_file())
}

/// A student run directory (its `model/`), a student model directory, or an ONNX CLIP directory
/// (an ONNX export is run by ONNX Runtime even when Hugging Face weights sit beside it).
pub fn load_model(path: &Path) -> Result<Box<dyn Embedder>> {
    let dir = model_dir(path);
    if !has_onnx(&dir) && dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        return Ok(Box::new(StudentModel::load(&dir)?));
    }
    if !dir.is_dir() {
        return Err(Error::model(path, "no such directory; expected a training run, a model directory or an ONNX CLIP export"));
    }
    let opts = SessionOptions { intra_threads: 0, ..Default::default() };
    OnnxClip::load(&dir, &opts).map(|c| Box::new(c) as Box<dyn Embedder>).map_err(|e| {
        Error::model(path, format!("neither a recap student (model.safetensors + config.json) nor a usable ONNX CLIP: {e}"))
    })
}

/// Top-1 accuracy of one task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskScore {
    pub top1: f64,
    /// Images with a label for this task.
    pub n: usize,
    /// Accuracy of always guessing the commonest class.
    pub majority: f64,
    /// Top-1 per class.
    pub per_class: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecallAt {
    pub r1: f64,
    pub r5: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Retrieval {
    pub image_to_text: RecallAt,
    pub text_to_image: RecallAt,
    pub n: usize,
}

/// What `recap eval --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub images: usize,
    pub zero_shot: BTreeMap<String, TaskScore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<Retrieval>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// Rank of `target` among `scores` (0 = best); ties count against the target.
fn rank_of(scores: &[f32], target: usize) -> usize {
    let s = scores[target];
    scores.iter().enumerate().filter(|(j, x)| *j != target && **x >= s).count()
}

/// Zero-shot classifier weights, as CLIP makes them: per class, its prompts (each template filled
/// with the class name) embedded, averaged, and normalised again.
pub fn class_embeddings(model: &mut dyn Embedder, classes: &[String], templates: &[String]) -> Result<Vec<Vec<f32>>> {
    classes
        .iter()
        .map(|c| {
            let prompts: Vec<String> = templates.iter().map(|t| t.replace("{}", c)).collect();
            let e = model.embed_texts(&prompts)?;
            let mut mean = vec![0f32; e[0].len()];
            for row in &e {
                mean.iter_mut().zip(row).for_each(|(m, x)| *m += x / e.len() as f32);
            }
            normalise(&mut mean);
            Ok(mean)
        })
        .collect()
}

/// Evaluate a model on a set, `batch` images at a time.
pub fn evaluate(model: &mut dyn Embedder, set: &EvalSet, batch: usize) -> Result<EvalReport> {
    let mut img_emb: Vec<Vec<f32>> = Vec::with_capacity(set.images.len());
    for (ci, chunk) in set.images.chunks(batch.max(1)).enumerate() {
        let imgs: Vec<RgbImage> = chunk
            .iter()
            .enumerate()
            .map(|(k, b)| {
                image::load_from_memory(b).map(|i| i.to_rgb8()).map_err(|e| bad(&set.path, format!("row {}: the image does not decode: {e}", ci * batch + k)))
            })
            .collect::<Result<_>>()?;
        img_emb.extend(model.embed_images(&imgs)?);
    }
    let mut zero_shot = BTreeMap::new();
    for (k, t) in set.spec.tasks.iter().enumerate() {
        let classifiers = class_embeddings(model, &t.classes, &t.templates)?;
        let (mut hits, mut n) = (0usize, 0usize);
        let mut per = vec![(0usize, 0usize); t.classes.len()];
        for (i, label) in set.labels[k].iter().enumerate() {
            let Some(label) = label else { continue };
            let scores: Vec<f32> = classifiers.iter().map(|w| dot(w, &img_emb[i])).collect();
            let pred = scores.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (j, s)| if *s > b.1 { (j, *s) } else { b }).0;
            n += 1;
            per[*label as usize].1 += 1;
            if pred == *label as usize {
                hits += 1;
                per[*label as usize].0 += 1;
            }
        }
        let majority = per.iter().map(|p| p.1).max().unwrap_or(0) as f64 / n.max(1) as f64;
        let per_class =
            t.classes.iter().zip(&per).filter(|(_, p)| p.1 > 0).map(|(c, p)| (c.clone(), p.0 as f64 / p.1 as f64)).collect();
        zero_shot.insert(t.name.clone(), TaskScore { top1: hits as f64 / n.max(1) as f64, n, majority, per_class });
    }
    let retrieval = match &set.captions {
        None => None,
        Some(caps) => {
            let idx: Vec<usize> = (0..caps.len()).filter(|&i| caps[i].is_some()).collect();
            if idx.len() < 2 {
                None
            } else {
                let texts: Vec<String> = idx.iter().map(|&i| caps[i].clone().expect("some")).collect();
                let mut txt = Vec::with_capacity(texts.len());
                for c in texts.chunks(batch.max(1)) {
                    txt.extend(model.embed_texts(c)?);
                }
                let n = idx.len();
                let sim: Vec<Vec<f32>> = idx.iter().map(|&i| txt.iter().map(|t| dot(&img_emb[i], t)).collect()).collect();
                let (mut i1, mut i5, mut t1, mut t5) = (0, 0, 0, 0);
                for q in 0..n {
                    let r = rank_of(&sim[q], q);
                    i1 += (r < 1) as usize;
                    i5 += (r < 5) as usize;
                    let col: Vec<f32> = (0..n).map(|j| sim[j][q]).collect();
                    let r = rank_of(&col, q);
                    t1 += (r < 1) as usize;
                    t5 += (r < 5) as usize;
                }
                let f = |x: usize| x as f64 / n as f64;
                Some(Retrieval { image_to_text: RecallAt { r1: f(i1), r5: f(i5) }, text_to_image: RecallAt { r1: f(t1), r5: f(t5) }, n })
            }
        }
    };
    Ok(EvalReport { model: model.name(), data: set.path.display().to_string(), images: set.images.len(), zero_shot, retrieval })
}

/// What `recap eval --dense` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DenseReport {
    pub model: String,
    pub data: String,
    pub images: usize,
    /// Training-free segmentation from text (MaskCLIP): each patch takes the class whose prompt
    /// embedding is nearest, upsampled bilinearly to the model's input size.
    pub zero_shot_segmentation: super::dense_metrics::SegScores,
    /// Side at which masks were compared (the model's input: shortest side resized, centre crop).
    pub resolution: usize,
    /// The finetuned head's scores, when the model is a `recap finetune` model directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<super::finetune::DenseHeadScores>,
}

/// A class mask through the same resize (shortest side to `s`, nearest) and centre crop as the
/// model's image processor, so labels and pixels stay aligned.
pub fn mask_to_input(mask: &[u32], w: u32, h: u32, s: usize) -> Vec<u32> {
    let (w, h) = (w as usize, h as usize);
    let (rw, rh) = if w <= h { (s, (s * h / w.max(1)).max(s)) } else { ((s * w / h.max(1)).max(s), s) };
    let (ox, oy) = ((rw - s) / 2, (rh - s) / 2);
    let mut out = Vec::with_capacity(s * s);
    for y in 0..s {
        let sy = (((oy + y) as f64 + 0.5) * h as f64 / rh as f64) as usize;
        for x in 0..s {
            let sx = (((ox + x) as f64 + 0.5) * w as f64 / rw as f64) as usize;
            out.push(mask[sy.min(h - 1) * w + sx.min(w - 1)]);
        }
    }
    out
}

/// MaskCLIP segmentation of a dense dataset's labelled images by a candle CLIP (a student, or a
/// teacher's Hugging Face weights), with CLIP's prompt templates for the class names.
pub fn evaluate_dense_zero_shot(path: &Path, set: &super::dense::DenseSet, templates: &[String], batch: usize) -> Result<DenseReport> {
    let dir = model_dir(path);
    if !(dir.join("model.safetensors").is_file() && dir.join("config.json").is_file()) {
        return Err(Error::model(path, "dense evaluation reads the model's layers: expected a recap student or a Hugging Face CLIP directory (model.safetensors + config.json)"));
    }
    let mut m = StudentModel::load(&dir)?;
    let s = m.clip.shape.vision.image_size;
    let grid = s / m.clip.shape.vision.patch_size;
    let classifiers: Vec<f32> = class_embeddings(&mut m, &set.spec.classes, templates)?.concat();
    let nc = set.spec.classes.len();
    let e = m.clip.shape.embed_dim;
    let cls = Tensor::from_vec(classifiers, (nc, e), &Device::Cpu).map_err(ce("classifiers"))?;
    let mut conf = super::dense_metrics::Confusion::new(nc, set.spec.ignore_index);
    let labelled: Vec<&super::dense::DenseRow> = set.rows.iter().filter(|r| r.mask.is_some()).collect();
    for chunk in labelled.chunks(batch.max(1)) {
        let imgs: Vec<RgbImage> = chunk
            .iter()
            .map(|r| image::load_from_memory(&r.image).map(|i| i.to_rgb8()).map_err(|e| bad(&set.path, format!("{}: the image does not decode: {e}", r.path))))
            .collect::<Result<_>>()?;
        let refs: Vec<&RgbImage> = imgs.iter().collect();
        let px = m.processor.batch(&refs, (s as u32, s as u32)).map_err(|e| Error::model(&dir, e))?;
        let px = Tensor::from_vec(px, (imgs.len(), 3, s, s), &Device::Cpu).map_err(ce("pixels"))?;
        let patches = l2_normalize(&m.clip.dense_embeddings(&px)?)?;
        // [B, N, C] → [B, C, g, g] → upsampled to [B, C, s, s].
        let logits = patches.broadcast_matmul(&cls.t().map_err(ce("t"))?).map_err(ce("patch logits"))?;
        let logits = logits.transpose(1, 2).and_then(|l| l.reshape((imgs.len(), nc, grid, grid))).map_err(ce("grid"))?;
        let up = super::ops::upsample_bilinear(&logits, (s, s)).map_err(ce("upsample"))?;
        let pred: Vec<Vec<u32>> = up.argmax(1).and_then(|p| p.flatten_from(1)).and_then(|p| p.to_vec2()).map_err(ce("argmax"))?;
        for (r, p) in chunk.iter().zip(pred) {
            let truth = mask_to_input(r.mask.as_ref().expect("labelled"), r.width, r.height, s);
            conf.add(&truth, &p);
        }
    }
    Ok(DenseReport {
        model: dir.display().to_string(),
        data: set.path.display().to_string(),
        images: labelled.len(),
        zero_shot_segmentation: conf.scores(&set.spec.classes),
        resolution: s,
        head: if dir.join("finetune.json").is_file() { Some(super::finetune::Finetuner::load(&dir)?.evaluate_on(set, batch)?) } else { None },
    })
}

/// CLIP's prompt templates for dense zero-shot labels.
pub fn default_dense_templates() -> Vec<String> {
    ["a photo of a {}.", "a {}.", "a picture of a {}.", "an image of a {}."].iter().map(|s| s.to_string()).collect()
}

pub fn format_dense_report(r: &DenseReport) -> String {
    let z = &r.zero_shot_segmentation;
    let mut s = format!(
        "{} on {} ({} labelled images, compared at {}x{})\n  zero-shot segmentation (MaskCLIP): mIoU {:.3}, pixel accuracy {:.3}, mean class accuracy {:.3}\n",
        r.model, r.data, r.images, r.resolution, r.resolution, z.miou, z.pixel_accuracy, z.mean_class_accuracy
    );
    let table = |s: &mut String, per_class: &std::collections::BTreeMap<String, super::dense_metrics::ClassScore>| {
        s.push_str(&format!("  {:<22} {:>7} {:>9} {:>10}\n", "class", "IoU", "accuracy", "pixels"));
        for (k, c) in per_class {
            s.push_str(&format!("  {:<22} {:>7.3} {:>9.3} {:>10}\n", k, c.iou, c.accuracy, c.pixels));
        }
    };
    table(&mut s, &z.per_class);
    if let Some(h) = &r.head {
        if let Some(seg) = &h.segmentation {
            s.push_str(&format!(
                "  finetuned segmentation head ({} images): mIoU {:.3}, pixel accuracy {:.3}, mean class accuracy {:.3}\n",
                h.images, seg.miou, seg.pixel_accuracy, seg.mean_class_accuracy
            ));
            table(&mut s, &seg.per_class);
        }
        if let Some(d) = &h.depth {
            s.push_str(&format!("  finetuned depth head ({} images): RMSE {:.3}, AbsRel {:.3}, δ<1.25 {:.3} ({} pixels)\n", h.images, d.rmse, d.abs_rel, d.delta1, d.pixels));
        }
    }
    s
}

/// The report as a table for a terminal.
pub fn format_report(r: &EvalReport) -> String {
    let mut s = format!("{} on {} ({} images)\n", r.model, r.data, r.images);
    s.push_str(&format!("  {:<22} {:>7} {:>9} {:>6}\n", "zero-shot task", "top-1", "majority", "n"));
    for (k, t) in &r.zero_shot {
        s.push_str(&format!("  {:<22} {:>7.3} {:>9.3} {:>6}\n", k, t.top1, t.majority, t.n));
    }
    if let Some(x) = &r.retrieval {
        s.push_str(&format!(
            "  retrieval ({} pairs)    image->text R@1 {:.3} R@5 {:.3}   text->image R@1 {:.3} R@5 {:.3}\n",
            x.n, x.image_to_text.r1, x.image_to_text.r5, x.text_to_image.r1, x.text_to_image.r5
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_the_processors_resize_and_crop() {
        // A 4x2 mask (wide): shortest side 2 -> 2, so 4x2 stays, then the centre 2x2 crop.
        let m = [0, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(mask_to_input(&m, 4, 2, 2), [1, 2, 5, 6]);
        // Upscaled 2x2 -> 4x4 by nearest: each label covers a 2x2 block.
        assert_eq!(mask_to_input(&[1, 2, 3, 4], 2, 2, 4), [1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]);
    }
}
