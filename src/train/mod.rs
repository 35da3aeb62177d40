//! `recap train`: a CLIP student trained with candle from reinforced shards, with MobileCLIP's
//! recipe (contrastive + distillation from the stored teacher embeddings; Vasu et al. 2024,
//! <https://arxiv.org/abs/2311.17049>, apple/ml-mobileclip) and open_clip's loop (AdamW with
//! parameter groups, warmup + cosine, clipping by global norm).
//!
//! A run directory holds `checkpoints/step-N/` (weights, optimiser moments, and the stream
//! position: everything `--resume` needs to continue with the same next batch and loss),
//! `metrics.jsonl`, `summary.json`, and `model/`, the final student in Hugging Face CLIP layout.

pub mod config;
pub mod data;
pub mod dense;
pub mod dense_metrics;
pub mod eval;
pub mod finetune;
pub mod inherit;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Problem, Result};
use config::{LossMode, TrainConfig, ViewChoice};
use data::{Batch, Loader, LoaderOptions, Position, Prep, ShardSet};
use model::{ce, l2_normalize, Clip, ClipShape};
use optim::{AdamW, AdamWSettings};

/// How a run is started.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in `output.dir`.
    pub resume: bool,
    /// Draw a progress bar when stderr is a terminal.
    pub progress: bool,
}

/// What a finished run reports (also `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub samples_seen: u64,
    pub parameters: usize,
    pub final_loss: f32,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Share of the wall time the step waited for data.
    pub data_wait_share: f64,
    pub samples_skipped: u64,
    pub resumed_from: Option<u64>,
    pub model_dir: String,
    pub last_eval_loss: Option<f32>,
    /// Zero-shot top-1 per task of `data.eval_set` at the last evaluation.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub last_zero_shot: std::collections::BTreeMap<String, f64>,
    /// The CLIP-score filter the run trained through, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<ScoreFilter>,
}

/// A checkpoint's `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    pub position: Position,
    pub samples_seen: u64,
    pub seed: u64,
    pub shape: ClipShape,
    pub loss: f32,
    pub seconds: f64,
    pub data_wait_seconds: f64,
    pub samples_skipped: u64,
}

/// Everything a run needs, checked: the config, the shards, the tokenizer, the student's shape.
pub struct TrainPlan {
    pub config: TrainConfig,
    pub label: String,
    pub shards: Arc<ShardSet>,
    pub eval_shards: Option<Arc<ShardSet>>,
    pub tokenizer: Arc<crate::models::hf::TextTokenizer>,
    pub tokenizer_dir: PathBuf,
    pub shape: ClipShape,
    pub teacher_scales: Vec<f32>,
    pub total_steps: u64,
    pub eval_set: Option<Arc<eval::EvalSet>>,
    /// The CLIP-score filter, when one is on: the threshold, and rows kept of the ok rows.
    pub filter: Option<ScoreFilter>,
}

/// What the CLIP-score filter keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoreFilter {
    pub min_clip_score: f32,
    pub kept_rows: u64,
    pub ok_rows: u64,
}

/// The eos id a tokenizer appends: the last special token of an empty text's encoding.
fn eos_of(tok: &tokenizers::Tokenizer) -> Option<u32> {
    let enc = tok.encode("", true).ok()?;
    let last = *enc.get_ids().last()?;
    let special = enc.get_special_tokens_mask().last().copied() == Some(1);
    special.then_some(last)
}

/// Check a training config against the files it names; every problem at once, at its YAML path.
pub fn plan(config: TrainConfig, label: &str) -> Result<TrainPlan> {
    let mut problems = config.problems();
    let mut add = |path: &str, e: Error| problems.push(Problem { path: path.into(), message: e.to_string() });
    let tok_path = config.tokenizer_path();
    let tokenizer_dir = tok_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let shape_ctx = config.shape(1, None).text.context_length;
    let tokenizer = if tok_path.file_name().is_some_and(|n| n == "tokenizer.json") && tok_path.is_file() {
        match crate::models::hf::TextTokenizer::load(&tokenizer_dir, shape_ctx) {
            Ok(t) => Some(t),
            Err(e) => {
                add("model.tokenizer", e);
                None
            }
        }
    } else {
        add("model.tokenizer", Error::Usage(format!("{:?} is not a tokenizer.json or a directory holding one", config.model.tokenizer)));
        None
    };
    let shards = match ShardSet::open(&config.data.shards) {
        Ok(s) => Some(s),
        Err(e) => {
            add("data.shards", e);
            None
        }
    };
    let eval_shards = match &config.data.eval_shards {
        None => None,
        Some(s) => match ShardSet::open(s) {
            Ok(s) => Some(s),
            Err(e) => {
                add("data.eval_shards", e);
                None
            }
        },
    };
    if let Err(e) = train_device(&config.train.device) {
        add("train.device", e);
    }
    let eval_set = match &config.data.eval_set {
        None => None,
        Some(p) => match eval::EvalSet::open(Path::new(p)) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                add("data.eval_set", e);
                None
            }
        },
    };
    let mut teacher_scales = Vec::new();
    if let Some(s) = &shards {
        let n = s.teachers.len();
        let given = &config.loss.teacher_scales;
        if given.len() == 1 {
            teacher_scales = vec![given[0] as f32; n];
        } else if given.len() == n {
            teacher_scales = given.iter().map(|x| *x as f32).collect();
        } else {
            problems.push(Problem {
                path: "loss.teacher_scales".into(),
                message: format!(
                    "{} values for {n} teacher{} in {} ({}); expected one value, or one per teacher",
                    given.len(),
                    if n == 1 { "" } else { "s" },
                    s.files[0].display(),
                    s.teachers.iter().map(|t| format!("{} {}-d", t.model, t.dim)).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if let Some(want) = &config.data.teacher_dims {
            let got: Vec<u32> = s.teachers.iter().map(|t| t.dim as u32).collect();
            if &got != want {
                problems.push(Problem {
                    path: "data.teacher_dims".into(),
                    message: format!(
                        "{want:?} expected, but {} holds teachers of widths {got:?} ({})",
                        s.files[0].display(),
                        s.teachers.iter().map(|t| t.model.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        let needs_synthetic = config.loss.mode == LossMode::Dr || config.data.synthetic_prob > 0.0;
        if needs_synthetic && !s.synthetic {
            problems.push(Problem {
                path: if config.loss.mode == LossMode::Dr { "loss.mode".into() } else { "data.synthetic_prob".into() },
                message: format!(
                    "needs synthetic captions but {} has no synthetic_captions column (the pipeline had no caption stage); expected data.synthetic_prob: 0 with loss.mode: mix",
                    s.files[0].display()
                ),
            });
        }
        if let Some(e) = &eval_shards {
            if e.teachers != s.teachers {
                problems.push(Problem { path: "data.eval_shards".into(), message: "were scored by other teachers than data.shards".into() });
            }
        }
    }
    if !problems.is_empty() {
        return Err(config::config_error(label, problems));
    }
    let tokenizer = tokenizer.expect("no problems");
    let mut shards = shards.expect("no problems");
    let mut filter = None;
    if config.data.min_clip_score.is_some() || config.data.clip_score_top_fraction.is_some() {
        // One read of the ok rows' scores serves the quantile and both counts.
        let scores = shards.ok_scores(true)?;
        let mut min = config.data.min_clip_score.map(|m| m as f32).unwrap_or(f32::NEG_INFINITY);
        if let Some(f) = config.data.clip_score_top_fraction {
            let q = data::score_quantile(&scores, f).ok_or_else(|| {
                let message = format!("{}: has no ok rows with a clip_score (no alt-text, or no score stage) to filter on", shards.spec);
                config::config_error(label, vec![Problem { path: "data.clip_score_top_fraction".into(), message }])
            })?;
            min = min.max(q);
        }
        shards.min_clip_score = Some(min);
        let ok_rows = scores.len() as u64;
        let kept_rows = scores.iter().filter(|s| s.is_some_and(|s| s >= min)).count() as u64;
        if kept_rows == 0 {
            let path = if config.data.min_clip_score.is_some() { "data.min_clip_score" } else { "data.clip_score_top_fraction" };
            return Err(config::config_error(label, vec![Problem { path: path.into(), message: format!("keeps none of the {ok_rows} ok rows (clip_score >= {min})") }]));
        }
        filter = Some(ScoreFilter { min_clip_score: min, kept_rows, ok_rows });
    }
    let shape = config.shape(tokenizer.inner.get_vocab_size(true), eos_of(&tokenizer.inner));
    if let Some(init) = &config.model.init_from {
        let problem = match inherit::teacher_shape(init) {
            Err(e) => Some(e.to_string()),
            Ok(t) => inherit::compatible(&shape, &t).err(),
        };
        if let Some(message) = problem {
            return Err(config::config_error(label, vec![Problem { path: "model.init_from".into(), message }]));
        }
    }
    let total_steps = match (config.train.steps, config.train.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => {
            let rows = shards.count_ok()?;
            ((rows as f64 * e) / config.train.batch_size as f64).ceil().max(1.0) as u64
        }
        (None, None) => unreachable!("checked by problems()"),
    };
    Ok(TrainPlan {
        label: label.to_string(),
        shards: Arc::new(shards),
        eval_shards: eval_shards.map(Arc::new),
        tokenizer: Arc::new(tokenizer),
        tokenizer_dir,
        shape,
        teacher_scales,
        total_steps,
        eval_set,
        filter,
        config,
    })
}

/// Read and plan a training file.
pub fn load(path: &Path, overrides: &[String]) -> Result<TrainPlan> {
    let cfg = config::parse_file(path, overrides)?;
    plan(cfg, &path.display().to_string())
}

fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Checkpoints in a run directory, oldest first: (step, dir).
pub fn checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(checkpoints_dir(out))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let step = name.strip_prefix("step-")?.parse().ok()?;
                    e.path().join("state.json").is_file().then(|| (step, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The losses of one step, as tensors (total for backward, parts for metrics).
struct StepLoss {
    total: Tensor,
    contrastive: f32,
    distill: f32,
}

/// What a step computes, besides the model: the loss weights and the teachers' slices and scales.
#[derive(Debug, Clone)]
pub struct StepSpec {
    pub loss: config::LossConfig,
    pub optim: config::OptimConfig,
    /// (offset, width) of each teacher in the stored embeddings.
    pub slices: Vec<(usize, usize)>,
    pub teacher_scales: Vec<f32>,
    /// Width of the stored embeddings.
    pub dim: usize,
}

/// The trainer's state between steps: the student, its optimiser, what a step computes.
pub struct Trainer {
    pub clip: Clip,
    pub spec: StepSpec,
    opt: AdamW,
    device: Device,
}

fn tensor(v: &[f32], shape: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::from_slice(v, shape, dev).map_err(ce("batch tensor"))
}

impl TrainPlan {
    pub fn step_spec(&self) -> StepSpec {
        StepSpec {
            loss: self.config.loss.clone(),
            optim: self.config.optim.clone(),
            slices: self.shards.slices(),
            teacher_scales: self.teacher_scales.clone(),
            dim: self.shards.dim,
        }
    }
}

impl Trainer {
    pub fn new(spec: StepSpec, clip: Clip) -> Result<Trainer> {
        let o = &spec.optim;
        let settings = AdamWSettings { beta1: o.beta1, beta2: o.beta2, eps: o.eps, weight_decay: o.weight_decay };
        let params = clip.params.vars.iter().map(|(k, v)| (k.clone(), v.clone(), model::Params::decays(k, v.as_tensor())));
        let opt = AdamW::new(params, settings)?;
        let device = clip.device.clone();
        Ok(Trainer { spec, clip, opt, device })
    }

    /// The losses of a batch, as the config weighs them.
    fn losses(&self, b: &Batch) -> Result<StepLoss> {
        let s = self.clip.shape.vision.image_size;
        let dev = &self.device;
        let px = tensor(&b.pixels, &[b.size, 3, s, s], dev)?;
        let n_txt = b.pool_at.len();
        let ids = Tensor::from_slice(&b.ids, (n_txt, b.len), dev).map_err(ce("ids"))?;
        let img = l2_normalize(&self.clip.encode_image(&px)?)?;
        let txt = l2_normalize(&self.clip.encode_text(&ids, &b.pool_at)?)?;
        let scale = self.clip.logit_scale()?;
        let dim = self.spec.dim;
        let t_img = tensor(&b.teacher_img, &[b.size, dim], dev)?;
        let t_txt = tensor(&b.teacher_txt, &[n_txt, dim], dev)?;
        let l = &self.spec.loss;
        let slices = &self.spec.slices;
        let groups = n_txt / b.size.max(1);
        let mut total: Option<Tensor> = None;
        let mut add = |term: Tensor, weight: f64| -> Result<()> {
            let term = (term * weight).map_err(ce("weight"))?;
            total = Some(match total.take() {
                None => term,
                Some(t) => (t + term).map_err(ce("sum"))?,
            });
            Ok(())
        };
        let (mut c_sum, mut d_sum) = (0f32, 0f32);
        for g in 0..groups {
            let txt_g = txt.narrow(0, g * b.size, b.size).map_err(ce("caption batch"))?;
            // One logits matrix serves both terms.
            let logits = loss::student_logits(&img, &txt_g, &scale)?;
            if l.contrastive_weight > 0.0 {
                let c = loss::contrastive(&logits)?;
                c_sum += c.to_scalar::<f32>().map_err(ce("loss"))?;
                add(c, l.contrastive_weight)?;
            }
            if l.distill_weight > 0.0 {
                let tt = t_txt.narrow(0, g * b.size, b.size).map_err(ce("teacher texts"))?;
                let targets = loss::teacher_targets(&t_img, &tt, slices, &self.spec.teacher_scales)?;
                let d = loss::distillation(&logits, &targets)?;
                d_sum += d.to_scalar::<f32>().map_err(ce("loss"))?;
                add(d, l.distill_weight)?;
            }
        }
        Ok(StepLoss { total: total.ok_or_else(|| Error::Internal("no loss term".into()))?, contrastive: c_sum, distill: d_sum })
    }

    /// One optimiser step on a batch; returns (loss, contrastive, distill, grad norm).
    pub fn step(&mut self, b: &Batch, lr: f64) -> Result<(f32, f32, f32, f32)> {
        let l = self.losses(b)?;
        let loss: f32 = l.total.to_scalar().map_err(ce("loss"))?;
        if !loss.is_finite() {
            return Err(Error::Internal(format!(
                "the loss is {loss} at step {} (learning rate {lr:.3e}); the run stops here, its last checkpoint is kept. Lower optim.lr, keep optim.grad_clip on, or check the shards' embeddings",
                self.opt.steps + 1
            )));
        }
        let grads = l.total.backward().map_err(ce("backward"))?;
        let norm = self.opt.grad_norm(&grads)?;
        let scale = match self.spec.optim.grad_clip {
            Some(max) if norm as f64 > max => max / (norm as f64 + 1e-6),
            _ => 1.0,
        };
        self.opt.step(&grads, lr, scale)?;
        self.clip.clamp_logit_scale()?;
        Ok((loss, l.contrastive, l.distill, norm))
    }

    /// The loss over prepared batches, without gradients.
    pub fn eval_loss(&self, batches: &[Batch]) -> Result<f32> {
        let mut sum = 0f64;
        let mut n = 0usize;
        for b in batches {
            let l = self.losses(b)?;
            sum += l.total.to_scalar::<f32>().map_err(ce("loss"))? as f64 * b.size as f64;
            n += b.size;
        }
        Ok((sum / n.max(1) as f64) as f32)
    }

    /// A checkpoint is a model directory (evaluable as it is by `recap eval`) plus the optimiser
    /// moments and the state.
    fn save_checkpoint(&self, out: &Path, state: &CheckpointState, keep: usize, tokenizer_dir: &Path) -> Result<()> {
        write_checkpoint(out, state.step, keep, |tmp| {
            write_model_dir(&self.clip, tokenizer_dir, tmp)?;
            self.opt.save(&tmp.join("optimizer.safetensors"))?;
            let json = serde_json::to_string_pretty(state).expect("state serialises");
            std::fs::write(tmp.join("state.json"), json).map_err(|e| Error::io("cannot write", tmp.join("state.json"), e))
        })
    }
}

/// Write checkpoint `checkpoints/step-N` of a run directory whole or not at all: `write` fills a
/// temporary directory (with a `state.json`), which is then renamed; checkpoints beyond the
/// newest `keep` are deleted.
pub(crate) fn write_checkpoint(out: &Path, step: u64, keep: usize, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = checkpoints_dir(out);
    let name = format!("step-{step:08}");
    let tmp = dir.join(format!(".tmp-{name}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
    write(&tmp)?;
    let fin = dir.join(&name);
    let _ = std::fs::remove_dir_all(&fin);
    std::fs::rename(&tmp, &fin).map_err(|e| Error::io("cannot move checkpoint into", &fin, e))?;
    let all = checkpoints(out);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// Write the student as a Hugging Face CLIP directory: config.json, model.safetensors,
/// preprocessor_config.json, and the tokenizer files.
pub fn write_model_dir(clip: &Clip, tokenizer_dir: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
    let cfg = serde_json::to_string_pretty(&clip.shape.hf_config()).expect("config serialises");
    std::fs::write(dir.join("config.json"), cfg).map_err(|e| Error::io("cannot write", dir.join("config.json"), e))?;
    let s = clip.shape.vision.image_size;
    let pre = serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true, "size": {"shortest_edge": s},
        "do_center_crop": true, "crop_size": {"height": s, "width": s},
        "resample": 3, "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": true,
    });
    std::fs::write(dir.join("preprocessor_config.json"), serde_json::to_string_pretty(&pre).expect("json"))
        .map_err(|e| Error::io("cannot write", dir.join("preprocessor_config.json"), e))?;
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let src = tokenizer_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f)).map_err(|e| Error::io("cannot copy", &src, e))?;
        }
    }
    clip.save(&dir.join("model.safetensors"))
}

#[derive(Serialize)]
struct MetricsLine {
    step: u64,
    samples: u64,
    epoch: u64,
    loss: f32,
    contrastive: f32,
    distill: f32,
    lr: f64,
    logit_scale: f32,
    grad_norm: f32,
    samples_per_s: f64,
    data_wait: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_loss: Option<f32>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    zero_shot: std::collections::BTreeMap<String, f64>,
}

/// Keep only the metrics lines up to `step` (what a checkpoint covers), so a resumed run's file
/// reads as one run.
pub(crate) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step")?.as_u64()).is_some_and(|s| s <= step))
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| Error::io("cannot rewrite", path, e))
}

/// Prepared held-out batches: the first `n` ok rows of the eval shards, in a fixed order.
fn eval_batches(set: &Arc<ShardSet>, prep: &Prep, n: usize, bs: usize) -> Result<Vec<Batch>> {
    let mut stream = data::EpochStream::new(set.clone(), 0, 0, 1);
    let mut rows = Vec::new();
    while rows.len() < n {
        match stream.next_row()? {
            Some(r) => rows.push((Position { epoch: 0, index: rows.len() as u64 }, r)),
            None => break,
        }
    }
    rows.chunks(bs).filter(|c| c.len() >= 2).map(|c| prep.batch(c, Position::default(), set.dim)).collect()
}

/// Run training as planned.
pub fn run(plan: TrainPlan, opts: &TrainOptions) -> Result<TrainSummary> {
    let cfg = plan.config.clone();
    let out = PathBuf::from(&cfg.output.dir);
    let device = train_device(&cfg.train.device)?;
    prepare_cpu(cfg.train.threads);
    let existing = checkpoints(&out);
    let (clip, state) = match existing.last() {
        Some((step, dir)) if opts.resume => {
            let sp = dir.join("state.json");
            let text = std::fs::read_to_string(&sp).map_err(|e| Error::io("cannot read", &sp, e))?;
            let st: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::model(&sp, format!("not a recap checkpoint state: {e}")))?;
            if st.shape != plan.shape {
                return Err(Error::model(
                    dir,
                    format!(
                        "the checkpoint is of another model shape: it holds {}, the config asks for {}",
                        serde_json::to_string(&st.shape).unwrap_or_default(),
                        serde_json::to_string(&plan.shape).unwrap_or_default()
                    ),
                ));
            }
            if st.seed != cfg.train.seed {
                return Err(Error::Usage(format!(
                    "{}: the checkpoint was trained with train.seed {}, the config says {}; resuming would change the data order",
                    dir.display(),
                    st.seed,
                    cfg.train.seed
                )));
            }
            let clip = Clip::load(&plan.shape, &dir.join("model.safetensors"), &device)?;
            tracing::info!(step, dir = %dir.display(), "resuming");
            (clip, Some((st, dir.clone())))
        }
        Some((step, dir)) => {
            return Err(Error::Usage(format!(
                "{} already holds a run (checkpoint at step {step}, {}); pass --resume to continue it, or choose another output.dir",
                out.display(),
                dir.display()
            )))
        }
        None => {
            let clip = Clip::init(&plan.shape, cfg.train.seed, &device)?;
            if let Some(init) = &cfg.model.init_from {
                let got = inherit::inherit(&clip, init)?;
                tracing::info!(whole = got.whole, sliced = got.sliced, partial = got.partial.len(), from = %init, "inherited teacher weights");
                eprintln!(
                    "initialised from {init}: {} tensors whole, {} sliced, {} partly (student wider){}",
                    got.whole,
                    got.sliced,
                    got.partial.len(),
                    if got.layers.iter().any(|(_, s, t)| s != t) {
                        format!("; layers {}", got.layers.iter().map(|(tw, s, t)| format!("{}{s}<-{t}", &tw[..1])).collect::<Vec<_>>().join(" "))
                    } else {
                        String::new()
                    }
                );
            }
            (clip, None)
        }
    };
    std::fs::create_dir_all(&out).map_err(|e| Error::io("cannot create", &out, e))?;
    let mut trainer = Trainer::new(plan.step_spec(), clip)?;
    let metrics_path = out.join("metrics.jsonl");
    let (mut step, mut position, mut samples_seen, mut seconds0, mut wait0, mut skipped) = (0u64, Position::default(), 0u64, 0.0, 0.0, 0u64);
    let resumed_from = if let Some((st, dir)) = &state {
        trainer.opt.load(&dir.join("optimizer.safetensors"), st.step)?;
        truncate_metrics(&metrics_path, st.step)?;
        step = st.step;
        position = st.position;
        samples_seen = st.samples_seen;
        seconds0 = st.seconds;
        wait0 = st.data_wait_seconds;
        skipped = st.samples_skipped;
        Some(st.step)
    } else {
        let _ = std::fs::remove_file(&metrics_path);
        None
    };
    let prep = Prep {
        image_size: plan.shape.vision.image_size as u32,
        processor: data::student_processor(plan.shape.vision.image_size as u32),
        tokenizer: plan.tokenizer.clone(),
        eos: plan.shape.eos_token_id,
        synthetic_prob: cfg.data.synthetic_prob,
        dual: cfg.loss.mode == LossMode::Dr,
        sequential_views: cfg.data.views == ViewChoice::Sequential,
        seed: cfg.train.seed,
        slices: plan.shards.slices(),
    };
    let eval = match &plan.eval_shards {
        Some(set) if cfg.train.eval_every > 0 => Some(eval_batches(set, &prep, cfg.train.eval_samples as usize, cfg.train.batch_size as usize)?),
        _ => None,
    };
    let lopts = LoaderOptions {
        batch_size: cfg.train.batch_size as usize,
        shuffle_buffer: cfg.data.shuffle_buffer as usize,
        workers: cfg.data.workers as usize,
        prefetch: cfg.data.prefetch as usize,
        seed: cfg.train.seed,
    };
    let total = plan.total_steps;
    let mut loader = Loader::start(plan.shards.clone(), prep, &lopts, position);
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).map_err(|e| Error::io("cannot open", &metrics_path, e))?;
    let progress = progress_bar(opts.progress, total, step);
    let started = Instant::now();
    let (mut wait, mut window_start, mut window_samples, mut window_wait) = (0.0f64, Instant::now(), 0u64, 0.0f64);
    let mut last_loss = f32::NAN;
    let mut last_eval = None;
    let mut last_zero_shot = std::collections::BTreeMap::new();
    let student_processor = data::student_processor(plan.shape.vision.image_size as u32);
    let o = cfg.optim.clone();
    while step < total {
        let t = Instant::now();
        let batch = loader.next_batch()?;
        let waited = t.elapsed().as_secs_f64();
        wait += waited;
        window_wait += waited;
        skipped += batch.skipped.len() as u64;
        for s in &batch.skipped {
            tracing::warn!(sample = %s, "sample skipped");
        }
        if batch.size < 2 {
            return Err(Error::Internal(format!("a batch of {} samples after skipping unreadable ones; contrastive training needs at least 2", batch.size)));
        }
        let lr = optim::cosine_lr(step, o.lr, o.min_lr, o.warmup_steps, total);
        let (loss, c, d, norm) = trainer.step(&batch, lr)?;
        step += 1;
        samples_seen += batch.size as u64;
        window_samples += batch.size as u64;
        position = batch.after;
        last_loss = loss;
        let eval_now = eval.as_ref().filter(|_| step % cfg.train.eval_every == 0 || step == total);
        let eval_loss = match eval_now {
            Some(b) => Some(trainer.eval_loss(b)?),
            None => None,
        };
        if eval_loss.is_some() {
            last_eval = eval_loss;
        }
        let zero_shot = match &plan.eval_set {
            Some(set) if cfg.train.eval_every > 0 && (step % cfg.train.eval_every == 0 || step == total) => {
                let mut live = eval::LiveStudent { clip: &trainer.clip, processor: &student_processor, tokenizer: &plan.tokenizer };
                let r = eval::evaluate(&mut live, set, 128)?;
                r.zero_shot.iter().map(|(k, v)| (k.clone(), v.top1)).collect()
            }
            _ => std::collections::BTreeMap::new(),
        };
        if !zero_shot.is_empty() {
            last_zero_shot = zero_shot.clone();
        }
        if step % cfg.train.log_every == 0 || step == total || eval_loss.is_some() || !zero_shot.is_empty() {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let line = MetricsLine {
                step,
                samples: samples_seen,
                epoch: position.epoch,
                loss,
                contrastive: c,
                distill: d,
                lr,
                logit_scale: trainer.clip.logit_scale()?.to_scalar().map_err(ce("scale"))?,
                grad_norm: norm,
                samples_per_s: window_samples as f64 / secs,
                data_wait: window_wait / secs,
                eval_loss,
                zero_shot,
            };
            writeln!(metrics, "{}", serde_json::to_string(&line).expect("metrics serialise")).map_err(|e| Error::io("cannot write", &metrics_path, e))?;
            progress.set_message(format!("loss {loss:.4} {:.1} samples/s", line.samples_per_s));
            (window_start, window_samples, window_wait) = (Instant::now(), 0, 0.0);
        }
        progress.set_position(step);
        if (cfg.train.checkpoint_every > 0 && step % cfg.train.checkpoint_every == 0) || step == total {
            let st = CheckpointState {
                step,
                position,
                samples_seen,
                seed: cfg.train.seed,
                shape: trainer.clip.shape.clone(),
                loss,
                seconds: seconds0 + started.elapsed().as_secs_f64(),
                data_wait_seconds: wait0 + wait,
                samples_skipped: skipped,
            };
            trainer.save_checkpoint(&out, &st, cfg.train.keep_checkpoints as usize, &plan.tokenizer_dir)?;
        }
    }
    progress.finish_and_clear();
    drop(loader);
    let model_dir = out.join("model");
    write_model_dir(&trainer.clip, &plan.tokenizer_dir, &model_dir)?;
    let seconds = started.elapsed().as_secs_f64();
    let run_samples = samples_seen - state.as_ref().map(|s| s.0.samples_seen).unwrap_or(0);
    let summary = TrainSummary {
        steps: step,
        samples_seen,
        parameters: trainer.clip.params.count(),
        final_loss: last_loss,
        seconds: seconds0 + seconds,
        samples_per_second: run_samples as f64 / seconds.max(1e-9),
        data_wait_share: wait / seconds.max(1e-9),
        samples_skipped: skipped,
        resumed_from,
        model_dir: model_dir.display().to_string(),
        last_eval_loss: last_eval,
        last_zero_shot,
        filter: plan.filter.clone(),
    };
    let sp = out.join("summary.json");
    std::fs::write(&sp, serde_json::to_string_pretty(&summary).expect("summary serialises")).map_err(|e| Error::io("cannot write", &sp, e))?;
    Ok(summary)
}

/// Set up the CPU for a training loop: `threads` (> 0) for candle's kernels, which size their
/// pool from RAYON_NUM_THREADS on every call, and freed memory kept ([`keep_freed_memory`]).
pub(crate) fn prepare_cpu(threads: u32) {
    if threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    keep_freed_memory();
}

/// A training step frees and reallocates the same large tensor buffers every step: tell mimalloc
/// (the binary's allocator) to keep freed memory instead of returning it to the OS after its
/// purge delay (1 s by default in mimalloc 3, the version linked), which made the kernel fault in
/// and zero fresh pages all step long (measured: 8100 page faults and 20% more CPU over 13 steps
/// of the tiny preset). Harmless under another allocator.
pub fn keep_freed_memory() {
    // mi_option_purge_delay (15 in mimalloc 2's and 3's option enums): -1 = never purge.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
}

/// The candle device a config names.
pub fn train_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s => {
            let n: usize = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest.trim_start_matches(':').parse().map_err(|_| Error::Usage(format!("train.device {s:?}: expected cpu, cuda or cuda:N")))?,
                None => return Err(Error::Usage(format!("train.device {s:?}: expected cpu, cuda or cuda:N"))),
            };
            Device::new_cuda(n).map_err(|e| {
                Error::Usage(format!(
                    "{e}; a CUDA run needs recap built with `cargo build --release --features cuda` (nvcc and the CUDA toolkit at build time)"
                ))
            })
        }
    }
}

pub(crate) fn progress_bar(enabled: bool, total: u64, at: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    let pb = if enabled && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr())
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{wide_bar}] step {pos}/{len} ETA {eta} {msg}") {
        pb.set_style(style);
    }
    pb.set_length(total);
    pb.set_position(at);
    pb
}
