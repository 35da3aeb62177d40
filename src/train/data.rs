//! Training data from reinforced shards: a stream of `ok` rows, shuffled through a buffer, cut into
//! batches whose images are rebuilt views and whose texts are tokenised, prepared on worker
//! threads ahead of the step.
//!
//! Order is a pure function of the seed: epoch e reads the shard files in an order drawn from
//! (seed, e), through a shuffle buffer drawn from (seed, e); a sample's view and caption are drawn
//! from (seed, e, uid). So the position "epoch e, n samples in" is the whole state of the stream:
//! a resumed run regenerates the order and skips n rows without decoding them, and gets the same
//! next batch as an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arrow::array::{Array, BinaryArray, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, ListArray, StringArray, StructArray, UInt32Array};
use arrow::record_batch::RecordBatch;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::{self, ViewParams};
use crate::error::{Error, Result};
use crate::models::hf::{ImageProcessor, SizeSpec, TextTokenizer};

/// Columns a trainer needs in every shard.
pub const REQUIRED: [&str; 7] = ["uid", "status", "caption", "image", "augmentations", "image_embeddings", "text_embeddings"];

/// One teacher of the shards' ensemble, as `recap.teachers` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Teacher {
    pub model: String,
    pub dim: usize,
}

/// A set of reinforced shard files, checked against the first one's layout.
#[derive(Debug, Clone)]
pub struct ShardSet {
    pub files: Vec<PathBuf>,
    pub teachers: Vec<Teacher>,
    /// Embedding width: the teachers' widths added up.
    pub dim: usize,
    /// Whether the shards have synthetic captions.
    pub synthetic: bool,
    /// What `--set data.shards=...` named, for messages.
    pub spec: String,
    /// Train only on rows whose `clip_score` (the teachers' mean cosine of the original view and
    /// the alt-text) is at least this (DataComp's CLIP-score filter); rows without a score are
    /// then skipped too.
    pub min_clip_score: Option<f32>,
}

fn data_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::input(path, e.to_string())
}

/// The teachers a shard file's metadata records and whether it has synthetic captions; a file
/// that lacks what training needs is refused, naming what is missing.
pub fn inspect(path: &Path) -> Result<(Vec<Teacher>, bool)> {
    let b = crate::sink::open_shard(path)?;
    let schema = b.schema();
    let missing: Vec<&str> = REQUIRED.iter().copied().filter(|c| schema.field_with_name(c).is_err()).collect();
    if !missing.is_empty() {
        let reinforced = missing.iter().any(|c| c.ends_with("embeddings") || *c == "augmentations");
        return Err(data_err(
            path,
            format!(
                "lacks the column{} {} that training needs{}",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", "),
                if reinforced { "; expected reinforced shards: run the pipeline with a score stage (see pipelines/demo.yaml)" } else { "" }
            ),
        ));
    }
    let meta = crate::sink::kv_metadata(&b);
    let teachers: Vec<Teacher> = match meta.get("recap.teachers") {
        None => return Err(data_err(path, "has no recap.teachers metadata; expected a reinforced shard written by `recap run` with a score stage")),
        Some(t) => serde_json::from_str(t).map_err(|e| data_err(path, format!("recap.teachers metadata is not valid: {e}")))?,
    };
    if teachers.is_empty() {
        return Err(data_err(path, "recap.teachers lists no teacher"));
    }
    Ok((teachers, schema.field_with_name("synthetic_captions").is_ok()))
}

impl ShardSet {
    /// A directory of `*.parquet` shards (hidden temporaries skipped) or a glob.
    pub fn open(spec: &str) -> Result<ShardSet> {
        let files = crate::sink::list_shards(spec)?;
        let first = &files[0];
        let (teachers, synthetic) = inspect(first)?;
        let dim = teachers.iter().map(|t| t.dim).sum();
        Ok(ShardSet { files, teachers, dim, synthetic, spec: spec.to_string(), min_clip_score: None })
    }

    /// (offset, width) of each teacher's slice of an embedding row.
    pub fn slices(&self) -> Vec<(usize, usize)> {
        let mut off = 0;
        self.teachers
            .iter()
            .map(|t| {
                let s = (off, t.dim);
                off += t.dim;
                s
            })
            .collect()
    }

    /// Number of rows training uses: ok, and past the CLIP-score filter when there is one (for
    /// `train.epochs`).
    pub fn count_ok(&self) -> Result<u64> {
        Ok(match self.min_clip_score {
            None => self.ok_scores(false)?.len() as u64,
            Some(m) => self.ok_scores(true)?.iter().filter(|s| s.is_some_and(|s| s >= m)).count() as u64,
        })
    }

    /// One entry per ok row: its `clip_score` when `scores` asks for them (None where the row
    /// has no alt-text), else None.
    pub fn ok_scores(&self, scores: bool) -> Result<Vec<Option<f32>>> {
        let cols: &[&str] = if scores { &["status", "clip_score"] } else { &["status"] };
        let mut out = Vec::new();
        for f in &self.files {
            for b in read_columns(f, cols, 8192)? {
                let b = b?;
                let s = col::<StringArray>(&b, "status", f)?;
                let sc = if scores { Some(col::<Float32Array>(&b, "clip_score", f)?) } else { None };
                for i in 0..b.num_rows() {
                    if !s.is_null(i) && s.value(i) == "ok" {
                        out.push(sc.and_then(|c| (!c.is_null(i)).then(|| c.value(i))));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The `clip_score` above which `fraction` of the scored rows lie (DataComp's "top 30%" is 0.3);
/// None when no row has a score.
pub fn score_quantile(scores: &[Option<f32>], fraction: f64) -> Option<f32> {
    let mut v: Vec<f32> = scores.iter().flatten().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| b.total_cmp(a));
    let keep = ((v.len() as f64 * fraction).ceil() as usize).clamp(1, v.len());
    Some(v[keep - 1])
}

/// Record batches of the named columns of one file.
fn read_columns(path: &Path, cols: &[&str], batch: usize) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    crate::sink::read_columns(path, cols, &[], batch, |c| format!("lacks the column {c} that training needs"))
}

/// One ok row, as stored.
#[derive(Debug, Clone)]
pub struct Row {
    pub uid: String,
    pub image: Vec<u8>,
    pub alt: Option<String>,
    pub synthetic: Vec<String>,
    pub views: Vec<ViewParams>,
    /// Views × dim.
    pub image_emb: Vec<half::f16>,
    /// (1 + K) × dim.
    pub text_emb: Vec<half::f16>,
    /// Where it came from, for messages.
    pub file: Arc<PathBuf>,
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| data_err(path, format!("column {name} does not have the reinforced shard's type (see schemas/reinforced.schema.json)")))
}

fn embeddings(list: &ListArray, i: usize, dim: usize, path: &Path, name: &str) -> Result<Vec<half::f16>> {
    let v = list.value(i);
    let fsl = v.as_any().downcast_ref::<FixedSizeListArray>().ok_or_else(|| data_err(path, format!("{name} rows are not fixed-size lists")))?;
    if fsl.value_length() as usize != dim {
        return Err(data_err(path, format!("{name} rows have {} values; expected {dim}, the teachers' widths in recap.teachers added up", fsl.value_length())));
    }
    let vals = fsl.values().as_any().downcast_ref::<Float16Array>().ok_or_else(|| data_err(path, format!("{name} is not float16")))?;
    let off = fsl.offset() * dim;
    Ok(vals.values()[off..off + fsl.len() * dim].to_vec())
}

fn views_of(list: &ListArray, i: usize, path: &Path) -> Result<Vec<ViewParams>> {
    let v = list.value(i);
    let s = v.as_any().downcast_ref::<StructArray>().ok_or_else(|| data_err(path, "augmentations rows are not structs"))?;
    let u = |n: &str| -> Result<&UInt32Array> {
        s.column_by_name(n).and_then(|c| c.as_any().downcast_ref::<UInt32Array>()).ok_or_else(|| data_err(path, format!("augmentations.{n} is not uint32")))
    };
    let (x, y, w, h) = (u("crop_x")?, u("crop_y")?, u("crop_w")?, u("crop_h")?);
    let flip = s.column_by_name("flip").and_then(|c| c.as_any().downcast_ref::<BooleanArray>()).ok_or_else(|| data_err(path, "augmentations.flip is not bool"))?;
    let ops = s.column_by_name("ops").and_then(|c| c.as_any().downcast_ref::<ListArray>()).ok_or_else(|| data_err(path, "augmentations.ops is not a list"))?;
    (0..s.len())
        .map(|j| {
            let o = ops.value(j);
            let o = o.as_any().downcast_ref::<StructArray>().ok_or_else(|| data_err(path, "augmentations.ops rows are not structs"))?;
            let names = o.column_by_name("op").and_then(|c| c.as_any().downcast_ref::<StringArray>()).ok_or_else(|| data_err(path, "ops.op is not utf8"))?;
            let vals = o.column_by_name("value").and_then(|c| c.as_any().downcast_ref::<Float32Array>()).ok_or_else(|| data_err(path, "ops.value is not float32"))?;
            Ok(ViewParams {
                crop_x: x.value(j),
                crop_y: y.value(j),
                crop_w: w.value(j),
                crop_h: h.value(j),
                flip: flip.value(j),
                ops: (0..o.len()).map(|k| augment::Op { op: names.value(k).to_string(), value: vals.value(k) }).collect(),
            })
        })
        .collect()
}

/// The ok rows of one record batch.
fn rows_of(b: &RecordBatch, path: &Arc<PathBuf>, dim: usize, synthetic: bool, min_score: Option<f32>) -> Result<Vec<Row>> {
    let p = path.as_path();
    let scores = match min_score {
        Some(_) => Some(col::<Float32Array>(b, "clip_score", p)?),
        None => None,
    };
    let status = col::<StringArray>(b, "status", p)?;
    let uid = col::<StringArray>(b, "uid", p)?;
    let alt = col::<StringArray>(b, "caption", p)?;
    let image = col::<StructArray>(b, "image", p)?;
    let bytes = image.column_by_name("bytes").and_then(|c| c.as_any().downcast_ref::<BinaryArray>()).ok_or_else(|| data_err(p, "image.bytes is not binary"))?;
    let augs = col::<ListArray>(b, "augmentations", p)?;
    let ie = col::<ListArray>(b, "image_embeddings", p)?;
    let te = col::<ListArray>(b, "text_embeddings", p)?;
    let syn = if synthetic { Some(col::<ListArray>(b, "synthetic_captions", p)?) } else { None };
    let mut out = Vec::new();
    for i in 0..b.num_rows() {
        if status.is_null(i) || status.value(i) != "ok" {
            continue;
        }
        if let (Some(min), Some(sc)) = (min_score, scores) {
            if sc.is_null(i) || sc.value(i) < min {
                continue;
            }
        }
        if bytes.is_null(i) || ie.is_null(i) || te.is_null(i) || augs.is_null(i) {
            return Err(data_err(p, format!("row {i} has status ok but no image or no reinforcement (image_embeddings, text_embeddings, augmentations)")));
        }
        let views = views_of(augs, i, p)?;
        let image_emb = embeddings(ie, i, dim, p, "image_embeddings")?;
        if image_emb.len() != views.len() * dim {
            return Err(data_err(p, format!("row {i}: {} image embeddings for {} augmentations", image_emb.len() / dim.max(1), views.len())));
        }
        let synthetic: Vec<String> = match syn {
            Some(s) if !s.is_null(i) => {
                let v = s.value(i);
                let v = v.as_any().downcast_ref::<StringArray>().ok_or_else(|| data_err(p, "synthetic_captions is not a list of utf8"))?;
                v.iter().map(|x| x.unwrap_or("").to_string()).collect()
            }
            _ => Vec::new(),
        };
        let text_emb = embeddings(te, i, dim, p, "text_embeddings")?;
        if text_emb.len() != (1 + synthetic.len()) * dim {
            return Err(data_err(p, format!("row {i}: {} text embeddings for the alt-text and {} synthetic captions", text_emb.len() / dim.max(1), synthetic.len())));
        }
        out.push(Row {
            uid: uid.value(i).to_string(),
            image: bytes.value(i).to_vec(),
            alt: (!alt.is_null(i) && !alt.value(i).trim().is_empty()).then(|| alt.value(i).to_string()),
            synthetic,
            views,
            image_emb,
            text_emb,
            file: path.clone(),
        });
    }
    Ok(out)
}

/// Where the stream stands: `index` samples of epoch `epoch` have been handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u64,
    pub index: u64,
}

/// Fisher–Yates, drawing from `rng`: the permutation is a function of the generator's state.
pub fn shuffle<T>(rng: &mut ChaCha8Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

fn seeded(parts: &[u64]) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (i, p) in parts.iter().take(4).enumerate() {
        key[i * 8..(i + 1) * 8].copy_from_slice(&p.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// The ok rows of epoch `epoch` in their training order, one at a time. Memory: one record batch
/// and the shuffle buffer.
pub struct EpochStream {
    set: Arc<ShardSet>,
    order: Vec<usize>,
    next_file: usize,
    pending: std::vec::IntoIter<Row>,
    reader: Option<(Arc<PathBuf>, Box<dyn Iterator<Item = Result<RecordBatch>> + Send>)>,
    buffer: Vec<Row>,
    capacity: usize,
    rng: ChaCha8Rng,
}

const STREAM_TAG: u64 = 0x5354_5245_414d;

impl EpochStream {
    pub fn new(set: Arc<ShardSet>, seed: u64, epoch: u64, buffer: usize) -> EpochStream {
        let mut rng = seeded(&[seed, epoch, STREAM_TAG]);
        let mut order: Vec<usize> = (0..set.files.len()).collect();
        shuffle(&mut rng, &mut order);
        EpochStream { set, order, next_file: 0, pending: Vec::new().into_iter(), reader: None, buffer: Vec::new(), capacity: buffer.max(1), rng }
    }

    /// The next row read from the files in this epoch's order, or None at the end.
    fn read_one(&mut self) -> Result<Option<Row>> {
        loop {
            if let Some(r) = self.pending.next() {
                return Ok(Some(r));
            }
            if let Some((path, reader)) = &mut self.reader {
                match reader.next() {
                    Some(b) => {
                        let rows = rows_of(&b?, path, self.set.dim, self.set.synthetic, self.set.min_clip_score)?;
                        self.pending = rows.into_iter();
                        continue;
                    }
                    None => self.reader = None,
                }
            }
            let Some(&f) = self.order.get(self.next_file) else { return Ok(None) };
            self.next_file += 1;
            let path = &self.set.files[f];
            // Every file, not only the first, must have the layout and teachers training expects.
            let (teachers, synthetic) = inspect(path)?;
            if teachers != self.set.teachers {
                return Err(data_err(
                    path,
                    format!("its teachers {} differ from the other shards' {}; train on shards scored by one ensemble", show(&teachers), show(&self.set.teachers)),
                ));
            }
            if synthetic != self.set.synthetic {
                return Err(data_err(path, "has synthetic captions where the other shards have none, or the reverse"));
            }
            let mut cols = REQUIRED.to_vec();
            if self.set.synthetic {
                cols.push("synthetic_captions");
            }
            if self.set.min_clip_score.is_some() {
                cols.push("clip_score");
            }
            let it = read_columns(path, &cols, 256)?;
            self.reader = Some((Arc::new(path.clone()), Box::new(it)));
        }
    }

    /// The next sample in training order.
    pub fn next_row(&mut self) -> Result<Option<Row>> {
        while self.buffer.len() < self.capacity {
            match self.read_one()? {
                Some(r) => self.buffer.push(r),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let i = self.rng.random_range(0..self.buffer.len());
        Ok(Some(self.buffer.swap_remove(i)))
    }
}

fn show(t: &[Teacher]) -> String {
    let parts: Vec<String> = t.iter().map(|t| format!("{} ({}-d)", t.model, t.dim)).collect();
    format!("[{}]", parts.join(", "))
}

/// How samples become tensors.
#[derive(Clone)]
pub struct Prep {
    pub image_size: u32,
    pub processor: ImageProcessor,
    pub tokenizer: Arc<TextTokenizer>,
    /// Where texts are pooled; None = their last token.
    pub eos: Option<u32>,
    pub synthetic_prob: f64,
    /// MobileCLIP's DR mode: an alt-text batch and a synthetic batch.
    pub dual: bool,
    pub sequential_views: bool,
    pub seed: u64,
    pub slices: Vec<(usize, usize)>,
}

/// The student's image processing: CLIP's (shortest side to `size` with bicubic, centre crop,
/// OpenAI mean and std).
pub fn student_processor(size: u32) -> ImageProcessor {
    ImageProcessor {
        resize: Some(SizeSpec::ShortestEdge(size)),
        filter: crate::config::model::ResizeFilter::CatmullRom,
        crop: Some((size, size)),
        rescale: Some(1.0 / 255.0),
        mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
        std: [0.268_629_54, 0.261_302_58, 0.275_777_1],
    }
}

/// View `v` of a stored image as the teachers saw it, at `size`: view 0 is the stored image
/// itself (the model's processor resizes and crops it), view v > 0 is `augment::render` of the
/// stored parameters. The score stage makes its views by this same rule.
pub fn replay_view(img: &RgbImage, views: &[ViewParams], v: usize, size: u32) -> std::result::Result<RgbImage, String> {
    if v == 0 {
        Ok(img.clone())
    } else {
        augment::render(img, &views[v], size)
    }
}

/// A batch ready for the step. Texts: B rows (mix) or 2B (dual: alt-texts, then synthetic).
pub struct Batch {
    pub size: usize,
    /// [B, 3, S, S]
    pub pixels: Vec<f32>,
    /// [texts, len]
    pub ids: Vec<u32>,
    pub len: usize,
    pub pool_at: Vec<u32>,
    /// [B, dim], each teacher slice L2-normalised.
    pub teacher_img: Vec<f32>,
    /// [texts, dim]
    pub teacher_txt: Vec<f32>,
    /// Position of the stream after this batch.
    pub after: Position,
    /// Samples left out, with why (a stored image that no longer decodes, ...).
    pub skipped: Vec<String>,
}

fn normalized(emb: &[half::f16], row: usize, dim: usize, slices: &[(usize, usize)], out: &mut Vec<f32>) {
    let r = &emb[row * dim..(row + 1) * dim];
    for &(off, w) in slices {
        let s: Vec<f32> = r[off..off + w].iter().map(|x| x.to_f32()).collect();
        let n = s.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        out.extend(s.iter().map(|x| x / n));
    }
}

impl Prep {
    /// Decode, replay the view, pick captions and tokenise, for each row of a batch.
    pub fn batch(&self, rows: &[(Position, Row)], after: Position, dim: usize) -> Result<Batch> {
        let s = self.image_size as usize;
        let mut pixels = Vec::with_capacity(rows.len() * 3 * s * s);
        let mut teacher_img = Vec::new();
        let mut alt_texts: Vec<String> = Vec::new();
        let mut syn_texts: Vec<String> = Vec::new();
        let mut alt_emb = Vec::new();
        let mut syn_emb = Vec::new();
        let mut skipped = Vec::new();
        for (pos, row) in rows {
            let mut rng = seeded(&[self.seed, pos.epoch, augment::uid_bits(&row.uid) as u64, 0x5341_4d50]);
            let v = if self.sequential_views { (pos.epoch as usize) % row.views.len() } else { rng.random_range(0..row.views.len()) };
            let img = match image::load_from_memory(&row.image) {
                Ok(i) => i.to_rgb8(),
                Err(e) => {
                    skipped.push(format!("{} uid {}: the stored image does not decode: {e}", row.file.display(), row.uid));
                    continue;
                }
            };
            let view = match replay_view(&img, &row.views, v, self.image_size) {
                Ok(x) => x,
                Err(e) => {
                    skipped.push(format!("{} uid {}: view {v} cannot be rebuilt: {e}", row.file.display(), row.uid));
                    continue;
                }
            };
            let k = row.synthetic.len();
            let syn_pick = (k > 0).then(|| rng.random_range(0..k));
            let want_syn = rng.random_bool(self.synthetic_prob.clamp(0.0, 1.0));
            // Text rows: 0 = alt-text, 1 + i = synthetic caption i.
            let (first, second) = if self.dual {
                match (row.alt.is_some(), syn_pick) {
                    (true, Some(j)) => (0, Some(1 + j)),
                    (false, Some(j)) => (1 + j, Some(1 + j)),
                    (true, None) => (0, None),
                    (false, None) => {
                        skipped.push(format!("{} uid {}: no alt-text and no synthetic caption", row.file.display(), row.uid));
                        continue;
                    }
                }
            } else {
                match (row.alt.is_some(), syn_pick) {
                    (true, Some(j)) if want_syn => (1 + j, None),
                    (false, Some(j)) => (1 + j, None),
                    (true, _) => (0, None),
                    (false, None) => {
                        skipped.push(format!("{} uid {}: no alt-text and no synthetic caption", row.file.display(), row.uid));
                        continue;
                    }
                }
            };
            if self.dual && second.is_none() {
                return Err(data_err(&row.file, "has no synthetic captions; loss.mode dr needs them (use loss.mode: mix with data.synthetic_prob: 0 for alt-text only)"));
            }
            self.processor.process_into(&view, &mut pixels).map_err(|e| Error::Internal(format!("student preprocessing: {e}")))?;
            normalized(&row.image_emb, v, dim, &self.slices, &mut teacher_img);
            let text = |j: usize| if j == 0 { row.alt.clone().unwrap_or_default() } else { row.synthetic[j - 1].clone() };
            alt_texts.push(text(first));
            normalized(&row.text_emb, first, dim, &self.slices, &mut alt_emb);
            if let Some(j) = second {
                syn_texts.push(text(j));
                normalized(&row.text_emb, j, dim, &self.slices, &mut syn_emb);
            }
        }
        let size = alt_texts.len();
        let mut texts = alt_texts;
        texts.extend(syn_texts);
        let mut teacher_txt = alt_emb;
        teacher_txt.extend(syn_emb);
        let (ids, pool_at, len) = self.tokenize(&texts)?;
        Ok(Batch { size, pixels, ids, len, pool_at, teacher_img, teacher_txt, after, skipped })
    }

    /// Token ids padded to the longest text, and the position each is pooled at (its first eos,
    /// else its last token).
    pub fn tokenize(&self, texts: &[String]) -> Result<(Vec<u32>, Vec<u32>, usize)> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (ids, mask, len) = self.tokenizer.batch(&refs).map_err(|e| Error::Internal(format!("tokenising: {e}")))?;
        let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
        let pool_at = (0..texts.len())
            .map(|r| {
                let row = &ids[r * len..(r + 1) * len];
                let valid = mask[r * len..(r + 1) * len].iter().filter(|m| **m == 1).count().max(1);
                self.eos.and_then(|e| row[..valid].iter().position(|&t| t == e)).unwrap_or(valid - 1) as u32
            })
            .collect();
        Ok((ids, pool_at, len))
    }
}

/// Batches prepared ahead on worker threads, handed out in stream order.
pub struct Loader {
    results: Receiver<(u64, Result<Batch>)>,
    ready: BTreeMap<u64, Result<Batch>>,
    next: u64,
    threads: Vec<JoinHandle<()>>,
}

pub struct LoaderOptions {
    pub batch_size: usize,
    pub shuffle_buffer: usize,
    pub workers: usize,
    pub prefetch: usize,
    pub seed: u64,
}

type Job = (u64, Vec<(Position, Row)>, Position);

impl Loader {
    /// Start the reader and the workers at `from`: the rows before it are read and dropped
    /// without decoding.
    pub fn start(set: Arc<ShardSet>, prep: Prep, opts: &LoaderOptions, from: Position) -> Loader {
        let (job_tx, job_rx) = sync_channel::<Job>(opts.prefetch.max(1));
        let (res_tx, res_rx) = sync_channel::<(u64, Result<Batch>)>(opts.prefetch.max(1) + opts.workers.max(1));
        let mut threads = Vec::new();
        let (bs, buf, seed) = (opts.batch_size, opts.shuffle_buffer, opts.seed);
        let set2 = set.clone();
        let res_tx2 = res_tx.clone();
        threads.push(std::thread::spawn(move || {
            if let Err(e) = produce(set2, bs, buf, seed, from, &job_tx) {
                let _ = res_tx2.send((u64::MAX, Err(e)));
            }
        }));
        let job_rx = Arc::new(Mutex::new(job_rx));
        let dim = set.dim;
        for _ in 0..opts.workers.max(1) {
            let (rx, tx, prep) = (job_rx.clone(), res_tx.clone(), prep.clone());
            threads.push(std::thread::spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                let Ok((seq, rows, after)) = job else { return };
                if tx.send((seq, prep.batch(&rows, after, dim))).is_err() {
                    return;
                }
            }));
        }
        Loader { results: res_rx, ready: BTreeMap::new(), next: 0, threads }
    }

    /// The next batch in order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        loop {
            if let Some(b) = self.ready.remove(&self.next) {
                self.next += 1;
                return b;
            }
            match self.results.recv() {
                Ok((u64::MAX, Err(e))) => return Err(e),
                Ok((seq, b)) => {
                    self.ready.insert(seq, b);
                }
                Err(_) => return Err(Error::Internal("the data workers stopped".into())),
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the result channel stops the workers and the reader at their next send.
        let (_, dead) = sync_channel(0);
        self.results = dead;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn produce(set: Arc<ShardSet>, bs: usize, buf: usize, seed: u64, from: Position, jobs: &SyncSender<Job>) -> Result<()> {
    let mut epoch = from.epoch;
    let mut stream = EpochStream::new(set.clone(), seed, epoch, buf);
    let mut index = 0u64;
    // Fast-forward: the same rows in the same order, dropped before any decoding.
    while index < from.index {
        if stream.next_row()?.is_none() {
            break;
        }
        index += 1;
    }
    let mut seq = 0u64;
    let mut rows: Vec<(Position, Row)> = Vec::with_capacity(bs);
    loop {
        match stream.next_row()? {
            Some(r) => {
                rows.push((Position { epoch, index }, r));
                index += 1;
                if rows.len() == bs {
                    let after = Position { epoch, index };
                    if jobs.send((seq, std::mem::replace(&mut rows, Vec::with_capacity(bs)), after)).is_err() {
                        return Ok(());
                    }
                    seq += 1;
                }
            }
            None => {
                if index == 0 {
                    let why = if set.min_clip_score.is_some() { "has no rows with status ok past the CLIP-score filter to train on" } else { "has no rows with status ok to train on" };
                    return Err(Error::input(Path::new(&set.spec), why));
                }
                epoch += 1;
                index = 0;
                stream = EpochStream::new(set.clone(), seed, epoch, buf);
            }
        }
    }
}
