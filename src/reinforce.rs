//! The model stages on a shard: caption → score → filter, run on the shard's ok rows once they
//! are all downloaded and encoded, a chunk of rows at a time. The stages read the stored (encoded, resized) image, which is
//! what the trainer will read too, so the teachers' targets match the student's inputs.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, ListArray, StringArray, StructArray, UInt32Array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields};
use half::f16;
use image::RgbImage;

use crate::augment::{self, AugmentSpec, ViewParams};
use crate::config::{CaptionConfig, DecodingKind, EarlyStoppingKind, FilterConfig, PipelineConfig, RankBy, ScoreConfig};
use crate::error::{Error, Problem, Problems, Result};
use crate::models::{Captioner, Clip, Decoding, Device, EarlyStopping, GenerateOptions, SessionOptions};
use crate::outcome::{Outcome, Status};
use crate::sink::schema::reinforced_fields;

/// What the model stages produced for one ok row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reinforcement {
    pub captions: Option<Vec<String>>,
    pub views: Vec<ViewParams>,
    /// (1 + A) × dim.
    pub image_embeddings: Vec<f16>,
    /// (1 + K) × dim.
    pub text_embeddings: Vec<f16>,
    pub clip_score: Option<f32>,
    pub synthetic_scores: Vec<f32>,
}

struct CaptionStage {
    model: Mutex<Captioner>,
    cfg: CaptionConfig,
}

struct ScoreStage {
    teachers: Vec<Mutex<Clip>>,
    cfg: ScoreConfig,
}

/// The loaded model stages of a pipeline.
pub struct Stages {
    caption: Option<CaptionStage>,
    score: Option<ScoreStage>,
    filter: Option<FilterConfig>,
    /// Embedding width: the teachers' widths added up.
    pub dim: usize,
    /// (model directory, width) per teacher, in concatenation order.
    pub teachers: Vec<(String, usize)>,
}

/// Rows whose stored images are decoded and run through the model stages together.
const CHUNK_ROWS: usize = 256;

/// Time spent in the model stages on one shard.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub caption: f64,
    pub score: f64,
}

fn session_options(device: &str, threads: u32) -> Result<SessionOptions> {
    Ok(SessionOptions { device: Device::parse(device).map_err(Error::Usage)?, intra_threads: threads as usize })
}

fn decoding(c: &CaptionConfig) -> Decoding {
    match c.decoding {
        DecodingKind::Greedy => Decoding::Greedy,
        DecodingKind::Beam => Decoding::Beam {
            width: c.beam_width as usize,
            length_penalty: c.length_penalty,
            early_stopping: match c.early_stopping {
                EarlyStoppingKind::Heuristic => EarlyStopping::Heuristic,
                EarlyStoppingKind::Finished => EarlyStopping::Finished,
                EarlyStoppingKind::Never => EarlyStopping::Never,
            },
        },
        DecodingKind::Sample => Decoding::Sample { temperature: c.temperature, top_k: c.top_k as usize, top_p: c.top_p },
    }
}

/// A sample's seed from its uid and the stage seed.
pub fn sample_seed(uid: &str, seed: u64) -> u64 {
    ((augment::uid_bits(uid) >> 64) as u64) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn f16s(v: &[f32]) -> impl Iterator<Item = f16> + '_ {
    v.iter().map(|x| f16::from_f32(*x))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Stages {
    /// Load the models the pipeline names and check their inputs and outputs; `None` when it has
    /// no model stage. Every model is tried, and each one that fails is a problem at its YAML
    /// path (`caption.model`, `score.teachers[1]`, `score.device`, ...), all reported at once.
    pub fn load(cfg: &PipelineConfig, label: &str) -> Result<Option<Stages>> {
        if cfg.caption.is_none() && cfg.score.is_none() && cfg.filter.is_none() {
            return Ok(None);
        }
        let mut problems = Vec::new();
        let mut problem = |path: &str, e: Error| problems.push(Problem { path: path.into(), message: e.to_string() });
        let mut caption = None;
        if let Some(c) = &cfg.caption {
            match session_options(&c.device, c.intra_threads) {
                Err(e) => problem("caption.device", e),
                Ok(opts) => match Captioner::load(c.model.as_ref(), &opts) {
                    Ok(model) => caption = Some(CaptionStage { model: Mutex::new(model), cfg: c.clone() }),
                    Err(e) => problem("caption.model", e),
                },
            }
        }
        let mut teachers_meta = Vec::new();
        let mut score = None;
        if let Some(s) = &cfg.score {
            match session_options(&s.device, s.intra_threads) {
                Err(e) => problem("score.device", e),
                Ok(opts) => {
                    let mut teachers = Vec::new();
                    for (i, t) in s.teachers.iter().enumerate() {
                        match Clip::load(t.as_ref(), &opts) {
                            Ok(clip) => {
                                teachers_meta.push((t.clone(), clip.dim));
                                teachers.push(Mutex::new(clip));
                            }
                            Err(e) => problem(&format!("score.teachers[{i}]"), e),
                        }
                    }
                    score = Some(ScoreStage { teachers, cfg: s.clone() });
                }
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config { file: label.to_string(), problems: Problems(problems) });
        }
        let dim = teachers_meta.iter().map(|t| t.1).sum();
        Ok(Some(Stages { caption, score, filter: cfg.filter.clone(), dim, teachers: teachers_meta }))
    }

    /// The columns these stages add to a shard.
    pub fn fields(&self) -> Vec<Field> {
        reinforced_fields(self.caption.is_some(), self.score.is_some(), self.dim)
    }

    /// Key-value metadata for the shard files.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let mut m = vec![("recap.reinforced_schema_version".to_string(), crate::sink::schema::reinforced_version().to_string())];
        if let Some(c) = &self.caption {
            m.push(("recap.captioner".into(), c.cfg.model.clone()));
        }
        if let Some(s) = &self.score {
            let teachers: Vec<serde_json::Value> =
                self.teachers.iter().map(|(p, d)| serde_json::json!({ "model": p, "dim": d })).collect();
            m.push(("recap.teachers".into(), serde_json::Value::Array(teachers).to_string()));
            m.push(("recap.embedding_dim".into(), self.dim.to_string()));
            m.push(("recap.augment_spec".into(), augment::SPEC_VERSION.to_string()));
            m.push(("recap.augmentations".into(), s.cfg.augmentations.to_string()));
        }
        m
    }

    /// Run caption → score → filter over a shard. `uids` and `alts` are per row; rows whose
    /// outcome is not ok are left alone. Rows may turn `decode_failed` (stored image unreadable)
    /// or `filtered`. Model errors (ONNX Runtime failing on a batch) stop the shard.
    pub fn run(&self, uids: &[Option<String>], alts: &[Option<String>], outcomes: &mut [Outcome]) -> Result<(Vec<Option<Reinforcement>>, StageTimes)> {
        let mut times = StageTimes::default();
        let mut out: Vec<Option<Reinforcement>> = vec![None; outcomes.len()];
        let ok: Vec<usize> = (0..outcomes.len()).filter(|&i| outcomes[i].status == Status::Ok && outcomes[i].image.is_some()).collect();
        // The stored images are decoded a chunk of rows at a time and dropped once captioned and
        // scored, so memory follows the chunk, not the shard.
        for chunk in ok.chunks(CHUNK_ROWS) {
            let mut rows = Vec::with_capacity(chunk.len());
            let mut images: Vec<RgbImage> = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let o = &mut outcomes[i];
                let Some(img) = &o.image else { continue };
                match image::load_from_memory(&img.bytes) {
                    Ok(d) => {
                        rows.push(i);
                        images.push(d.to_rgb8());
                    }
                    Err(e) => {
                        o.status = Status::DecodeFailed;
                        o.reason = Some(format!("the stored image does not decode for the model stages: {e}"));
                        o.image = None;
                    }
                }
            }
            for &i in &rows {
                out[i] = Some(Reinforcement::default());
            }
            if let Some(c) = &self.caption {
                let t = Instant::now();
                self.caption(c, &rows, &images, uids, &mut out)?;
                times.caption += t.elapsed().as_secs_f64();
            }
            if let Some(s) = &self.score {
                let t = Instant::now();
                self.score(s, &rows, &images, uids, alts, &mut out)?;
                times.score += t.elapsed().as_secs_f64();
            }
        }
        // Filters last, over the whole shard: top-k% ranks every row.
        if let Some(f) = &self.filter {
            filter(f, alts, outcomes, &mut out);
        }
        Ok((out, times))
    }

    fn caption(&self, c: &CaptionStage, rows: &[usize], images: &[RgbImage], uids: &[Option<String>], out: &mut [Option<Reinforcement>]) -> Result<()> {
        let uid = |i: usize| uids[i].as_deref().unwrap_or("");
        let mut model = c.model.lock().map_err(|_| Error::Internal("captioner lock poisoned".into()))?;
        let opts = GenerateOptions {
            decoding: decoding(&c.cfg),
            num_captions: c.cfg.num_captions as usize,
            max_new_tokens: c.cfg.max_new_tokens as usize,
        };
        let bs = c.cfg.batch_size as usize;
        for (chunk_rows, chunk_imgs) in rows.chunks(bs).zip(images.chunks(bs)) {
            let refs: Vec<&RgbImage> = chunk_imgs.iter().collect();
            let seeds: Vec<u64> = chunk_rows.iter().map(|&i| sample_seed(uid(i), c.cfg.seed)).collect();
            let gen = model.generate(&refs, &seeds, &opts).map_err(|e| Error::model(&c.cfg.model, e))?;
            for (&i, seqs) in chunk_rows.iter().zip(gen) {
                let texts = seqs
                    .iter()
                    .map(|s| model.decode(s, c.cfg.cut_at_period))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::model(&c.cfg.model, e))?;
                out[i].as_mut().expect("ok row").captions = Some(texts);
            }
        }
        Ok(())
    }

    fn score(
        &self,
        s: &ScoreStage,
        rows: &[usize],
        images: &[RgbImage],
        uids: &[Option<String>],
        alts: &[Option<String>],
        out: &mut [Option<Reinforcement>],
    ) -> Result<()> {
        let spec = AugmentSpec {
            min_scale: s.cfg.augment.min_scale,
            max_scale: s.cfg.augment.max_scale,
            ops: s.cfg.augment.ops as usize,
            magnitude: s.cfg.augment.magnitude,
        };
        let a = s.cfg.augmentations as usize;
        // View parameters: the same for every teacher.
        for (&i, img) in rows.iter().zip(images) {
            let (w, h) = img.dimensions();
            let uid = uids[i].as_deref().unwrap_or("");
            let mut views = vec![ViewParams::identity(w, h)];
            views.extend((1..=a as u32).map(|v| augment::draw(&mut augment::rng_for(uid, v, s.cfg.seed), w, h, &spec)));
            out[i].as_mut().expect("ok row").views = views;
        }
        let k = self.caption.as_ref().map(|c| c.cfg.num_captions as usize).unwrap_or(0);
        let bs = s.cfg.batch_size as usize;
        let n = rows.len();
        // Per teacher: [row][view] and [row][text] embeddings, L2-normalised.
        let mut img_emb: Vec<Vec<Vec<f32>>> = Vec::new();
        let mut txt_emb: Vec<Vec<Vec<f32>>> = Vec::new();
        let mut alt_present = vec![false; n];
        for (ti, teacher) in s.teachers.iter().enumerate() {
            let mut clip = teacher.lock().map_err(|_| Error::Internal("teacher lock poisoned".into()))?;
            let name = self.teachers[ti].0.clone();
            let d = clip.dim;
            let (h, w) = clip.image_hw;
            let side = h.max(w);
            let mut per_view = Vec::with_capacity(n * (a + 1));
            // Views, rendered at the teacher's input size, in batches.
            let mut jobs: Vec<(usize, usize)> = Vec::with_capacity(n * (a + 1));
            for r in 0..n {
                for v in 0..=a {
                    jobs.push((r, v));
                }
            }
            for chunk in jobs.chunks(bs) {
                let rendered: Vec<RgbImage> = chunk
                    .iter()
                    .map(|&(r, v)| {
                        if v == 0 {
                            Ok(images[r].clone())
                        } else {
                            let p = &out[rows[r]].as_ref().expect("ok row").views[v];
                            augment::render(&images[r], p, side)
                        }
                    })
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| Error::Internal(format!("augmentation: {e}")))?;
                let refs: Vec<&RgbImage> = rendered.iter().collect();
                let e = clip.embed_images(&refs).map_err(|e| Error::model(&name, e))?;
                per_view.extend(e.chunks(d).map(|c| c.to_vec()));
            }
            img_emb.push(per_view.chunks(a + 1).map(|c| c.concat()).collect());
            // Texts: alt-text (when there is one) then the synthetic captions.
            let mut texts: Vec<(usize, usize, String)> = Vec::new();
            for (r, &i) in rows.iter().enumerate() {
                if let Some(alt) = &alts[i] {
                    texts.push((r, 0, alt.clone()));
                    alt_present[r] = true;
                }
                if let Some(caps) = out[i].as_ref().and_then(|o| o.captions.as_ref()) {
                    for (j, c) in caps.iter().enumerate() {
                        texts.push((r, j + 1, c.clone()));
                    }
                }
            }
            let mut per_text = vec![vec![0f32; (1 + k) * d]; n];
            for chunk in texts.chunks(bs) {
                let refs: Vec<&str> = chunk.iter().map(|t| t.2.as_str()).collect();
                let e = clip.embed_texts(&refs).map_err(|e| Error::model(&name, e))?;
                for ((r, j, _), emb) in chunk.iter().zip(e.chunks(d)) {
                    per_text[*r][j * d..(j + 1) * d].copy_from_slice(emb);
                }
            }
            txt_emb.push(per_text);
        }
        let dims: Vec<usize> = self.teachers.iter().map(|t| t.1).collect();
        let nt = dims.len() as f32;
        for (r, &i) in rows.iter().enumerate() {
            let o = out[i].as_mut().expect("ok row");
            let mut image = Vec::with_capacity((a + 1) * self.dim);
            for v in 0..=a {
                for (t, d) in dims.iter().enumerate() {
                    image.extend(f16s(&img_emb[t][r][v * d..(v + 1) * d]));
                }
            }
            let mut text = Vec::with_capacity((1 + k) * self.dim);
            for j in 0..=k {
                for (t, d) in dims.iter().enumerate() {
                    text.extend(f16s(&txt_emb[t][r][j * d..(j + 1) * d]));
                }
            }
            // Scores from the f32 embeddings of the original view: mean cosine over teachers.
            let score = |j: usize| -> f32 {
                dims.iter().enumerate().map(|(t, d)| dot(&img_emb[t][r][..*d], &txt_emb[t][r][j * d..(j + 1) * d])).sum::<f32>() / nt
            };
            o.clip_score = alt_present[r].then(|| score(0));
            o.synthetic_scores = (1..=o.captions.as_ref().map(Vec::len).unwrap_or(0)).map(score).collect();
            o.image_embeddings = image;
            o.text_embeddings = text;
        }
        Ok(())
    }

    /// The reinforced columns for a shard's rows.
    pub fn columns(&self, rows: &[Option<Reinforcement>], outcomes: &[Outcome]) -> Result<Vec<ArrayRef>> {
        let fields = self.fields();
        let keep_embeddings: Vec<bool> = outcomes.iter().map(|o| o.status == Status::Ok).collect();
        let mut cols = Vec::new();
        for f in &fields {
            let col: ArrayRef = match f.name().as_str() {
                "synthetic_captions" => {
                    let lists: Vec<Option<&Vec<String>>> = rows.iter().map(|r| r.as_ref().and_then(|r| r.captions.as_ref())).collect();
                    let values: StringArray = lists.iter().flatten().flat_map(|v| v.iter().map(|s| Some(s.as_str()))).collect();
                    Arc::new(list_of(f, lists.iter().map(|l| l.map(|v| v.len())), Arc::new(values))?)
                }
                "augmentations" => {
                    let present: Vec<Option<&Vec<ViewParams>>> =
                        rows.iter().map(|r| r.as_ref().filter(|r| !r.views.is_empty()).map(|r| &r.views)).collect();
                    let views: Vec<&ViewParams> = present.iter().flatten().flat_map(|v| v.iter()).collect();
                    let DataType::List(item) = f.data_type() else { return Err(Error::Internal("augmentations is not a list".into())) };
                    let DataType::Struct(vf) = item.data_type() else { return Err(Error::Internal("augmentation is not a struct".into())) };
                    let ops_field = vf.iter().find(|x| x.name() == "ops").expect("ops field").clone();
                    let DataType::List(op_item) = ops_field.data_type() else { return Err(Error::Internal("ops is not a list".into())) };
                    let DataType::Struct(opf) = op_item.data_type() else { return Err(Error::Internal("op is not a struct".into())) };
                    let ops: Vec<&augment::Op> = views.iter().flat_map(|v| v.ops.iter()).collect();
                    let op_struct = StructArray::try_new(
                        opf.clone(),
                        vec![
                            Arc::new(ops.iter().map(|o| Some(o.op.as_str())).collect::<StringArray>()) as ArrayRef,
                            Arc::new(ops.iter().map(|o| Some(o.value)).collect::<Float32Array>()),
                        ],
                        None,
                    )
                    .map_err(|e| Error::data("augmentation ops", e))?;
                    let ops_list = list_of(&ops_field, views.iter().map(|v| Some(v.ops.len())), Arc::new(op_struct))?;
                    let u32s = |g: fn(&ViewParams) -> u32| Arc::new(views.iter().map(|v| Some(g(v))).collect::<UInt32Array>()) as ArrayRef;
                    let view_struct = StructArray::try_new(
                        Fields::from(vf.iter().cloned().collect::<Vec<_>>()),
                        vec![
                            u32s(|v| v.crop_x),
                            u32s(|v| v.crop_y),
                            u32s(|v| v.crop_w),
                            u32s(|v| v.crop_h),
                            Arc::new(views.iter().map(|v| Some(v.flip)).collect::<BooleanArray>()),
                            Arc::new(ops_list),
                        ],
                        None,
                    )
                    .map_err(|e| Error::data("augmentations", e))?;
                    Arc::new(list_of(f, present.iter().map(|p| p.map(|v| v.len())), Arc::new(view_struct))?)
                }
                "image_embeddings" | "text_embeddings" => {
                    let img = f.name() == "image_embeddings";
                    fn get(r: &Reinforcement, img: bool) -> &Vec<f16> {
                        if img {
                            &r.image_embeddings
                        } else {
                            &r.text_embeddings
                        }
                    }
                    let present: Vec<Option<&Vec<f16>>> = rows
                        .iter()
                        .zip(&keep_embeddings)
                        .map(|(r, keep)| r.as_ref().filter(|_| *keep).map(|r| get(r, img)).filter(|v| !v.is_empty()))
                        .collect();
                    let values: Float16Array = present.iter().flatten().flat_map(|v| v.iter().copied().map(Some)).collect();
                    let DataType::List(item) = f.data_type() else { return Err(Error::Internal("embeddings is not a list".into())) };
                    let DataType::FixedSizeList(inner, d) = item.data_type() else { return Err(Error::Internal("embedding is not fixed-size".into())) };
                    let fsl = FixedSizeListArray::try_new(inner.clone(), *d, Arc::new(values), None).map_err(|e| Error::data(f.name().clone(), e))?;
                    Arc::new(list_of(f, present.iter().map(|p| p.map(|v| v.len() / self.dim.max(1))), Arc::new(fsl))?)
                }
                "clip_score" => Arc::new(rows.iter().map(|r| r.as_ref().and_then(|r| r.clip_score)).collect::<Float32Array>()),
                "synthetic_clip_scores" => {
                    let present: Vec<Option<&Vec<f32>>> =
                        rows.iter().map(|r| r.as_ref().filter(|r| r.captions.is_some()).map(|r| &r.synthetic_scores)).collect();
                    let values: Float32Array = present.iter().flatten().flat_map(|v| v.iter().copied().map(Some)).collect();
                    Arc::new(list_of(f, present.iter().map(|p| p.map(|v| v.len())), Arc::new(values))?)
                }
                other => return Err(Error::Internal(format!("no builder for reinforced column {other}"))),
            };
            cols.push(col);
        }
        Ok(cols)
    }
}

/// A list column from per-row lengths (None = null row) and the flattened values.
fn list_of(f: &Field, lens: impl Iterator<Item = Option<usize>>, values: ArrayRef) -> Result<ListArray> {
    let lens: Vec<Option<usize>> = lens.collect();
    let offsets = OffsetBuffer::from_lengths(lens.iter().map(|l| l.unwrap_or(0)));
    let nulls = NullBuffer::from(lens.iter().map(Option::is_some).collect::<Vec<bool>>());
    let DataType::List(item) = f.data_type() else { return Err(Error::Internal(format!("{} is not a list", f.name()))) };
    ListArray::try_new(item.clone(), offsets, values, Some(nulls)).map_err(|e| Error::data(format!("column {}", f.name()), e))
}

/// Apply the thresholds, then the shard-level top percentage.
fn filter(f: &FilterConfig, alts: &[Option<String>], outcomes: &mut [Outcome], out: &mut [Option<Reinforcement>]) {
    let mark = |o: &mut Outcome, reason: String| {
        o.status = Status::Filtered;
        o.reason = Some(reason);
        o.image = None;
    };
    for (i, o) in outcomes.iter_mut().enumerate() {
        if o.status != Status::Ok {
            continue;
        }
        let r = out[i].as_ref();
        let words = alts[i].as_deref().map(|a| a.split_whitespace().count() as u32).unwrap_or(0);
        let best = r.and_then(|r| r.synthetic_scores.iter().copied().reduce(f32::max));
        let side = o.original_width.zip(o.original_height).map(|(w, h)| w.min(h));
        let reason = if let (Some(min), Some(score)) = (f.min_alt_score, r.map(|r| r.clip_score)) {
            match score {
                None => Some("no alt-text to score (filter.min_alt_score)".to_string()),
                Some(s) if s < min => Some(format!("alt-text CLIP score {s:.3} < filter.min_alt_score {min}")),
                _ => None,
            }
        } else {
            None
        }
        .or_else(|| match (f.min_best_synthetic_score, best) {
            (Some(min), Some(b)) if b < min => Some(format!("best synthetic caption score {b:.3} < filter.min_best_synthetic_score {min}")),
            _ => None,
        })
        .or_else(|| match f.min_caption_words {
            Some(min) if words < min => Some(format!("alt-text has {words} words < filter.min_caption_words {min}")),
            _ => None,
        })
        .or_else(|| match f.max_caption_words {
            Some(max) if words > max => Some(format!("alt-text has {words} words > filter.max_caption_words {max}")),
            _ => None,
        })
        .or_else(|| match (f.min_image_side, side) {
            (Some(min), Some(s)) if s < min => Some(format!("original shorter side {s}px < filter.min_image_side {min}")),
            _ => None,
        });
        if let Some(reason) = reason {
            mark(o, reason);
        }
    }
    if let Some(pct) = f.top_percent {
        let key = |r: &Reinforcement| match f.rank_by {
            RankBy::AltScore => r.clip_score,
            RankBy::BestSyntheticScore => r.synthetic_scores.iter().copied().reduce(f32::max),
        };
        let mut ranked: Vec<(usize, f32)> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| o.status == Status::Ok)
            .map(|(i, _)| (i, out[i].as_ref().and_then(key).unwrap_or(f32::NEG_INFINITY)))
            .collect();
        ranked.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal).then(a.0.cmp(&b.0)));
        let keep = ((ranked.len() as f64) * pct / 100.0).ceil() as usize;
        let by = match f.rank_by {
            RankBy::AltScore => "alt-text CLIP score",
            RankBy::BestSyntheticScore => "best synthetic caption score",
        };
        for (rank, (i, _)) in ranked.iter().enumerate().skip(keep) {
            mark(&mut outcomes[*i], format!("rank {} of {} by {by}, outside filter.top_percent {pct}", rank + 1, ranked.len()));
        }
    }
}
