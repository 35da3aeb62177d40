//! The training file (`recap train TRAIN.yaml`), as serde structs. Every field is documented
//! here: this is the user reference, and `schemas/train.schema.json` is generated from it
//! (`recap schema train`). Parsing shares the pipeline's machinery: YAML → `--set` overrides →
//! JSON Schema check (every problem at once, with its YAML path) → typed config → checks that
//! need the files (shards, tokenizer, init weights).

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::{Activation, ClipShape, TextShape, VisionShape};
use crate::error::{Error, Problem, Problems, Result};

/// A training run: reinforced shards in, a CLIP student out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "recap training run")]
pub struct TrainConfig {
    /// The reinforced shards and how samples are drawn from them.
    pub data: DataConfig,
    /// The student's shape and tokenizer.
    pub model: ModelConfig,
    /// Contrastive and distillation weights.
    #[serde(default)]
    pub loss: LossConfig,
    /// AdamW and its schedule.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Batch size, length, seed, checkpoints.
    #[serde(default)]
    pub train: TrainLoopConfig,
    /// Where checkpoints, metrics and the final model go.
    pub output: TrainOutputConfig,
}

/// How a stored view is chosen for a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ViewChoice {
    /// Uniformly among the stored views (the original and the augmentations), per sample and epoch.
    Uniform,
    /// View `epoch % views` (ml-mobileclip's sequential option): each epoch sees a new view.
    Sequential,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Directory of reinforced shards as `recap run` writes them (`*.parquet`; only rows with
    /// status `ok` are used), or a glob of shard files. Files are streamed, never all loaded.
    pub shards: String,
    /// Optional held-out shards (same layout): their contrastive loss is measured every
    /// `train.eval_every` steps.
    #[serde(default)]
    pub eval_shards: Option<String>,
    /// Optional evaluation set (eval.parquet, see `recap eval`): zero-shot top-1 of each of its
    /// tasks every `train.eval_every` steps, in metrics.jsonl (a learning curve).
    #[serde(default)]
    pub eval_set: Option<String>,
    /// Probability of training on a synthetic caption instead of the alt-text (Recap-DataComp's
    /// p), in `loss.mode: mix`. 0 is alt-text only; rows without an alt-text always use a
    /// synthetic caption.
    #[serde(default = "default_synthetic_prob")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub synthetic_prob: f64,
    #[serde(default = "default_views")]
    pub views: ViewChoice,
    /// DataComp's CLIP-score filter: train only on rows whose `clip_score` (the teachers' mean
    /// cosine of the image and its alt-text) is at least this. Rows without an alt-text are
    /// skipped while a filter is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_clip_score: Option<f64>,
    /// DataComp's CLIP-score filter by rank: keep this share of the ok rows with the highest
    /// `clip_score` (DataComp's best: 0.3). With `min_clip_score` too, the stricter applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub clip_score_top_fraction: Option<f64>,
    /// The widths of the shards' teachers, in `recap.teachers` order, when the run depends on
    /// them (e.g. 768 768 for two ViT-L/14): shards scored by other teachers are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_dims: Option<Vec<u32>>,
    /// Samples held in the shuffle buffer (more mixes better and costs memory: each holds its
    /// stored image).
    #[serde(default = "default_shuffle_buffer")]
    #[schemars(range(min = 1))]
    pub shuffle_buffer: u32,
    /// Threads that decode, rebuild views and tokenise ahead of the training step.
    #[serde(default = "default_workers")]
    #[schemars(range(min = 1, max = 256))]
    pub workers: u32,
    /// Batches prepared ahead of the step.
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 1024))]
    pub prefetch: u32,
}

fn default_synthetic_prob() -> f64 {
    0.8
}
fn default_views() -> ViewChoice {
    ViewChoice::Uniform
}
fn default_shuffle_buffer() -> u32 {
    2048
}
fn default_workers() -> u32 {
    2
}
fn default_prefetch() -> u32 {
    4
}

/// Named student shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// 64 px, patch 8, width 64, 2+2 layers: about a second per step of 64 on 2 CPU cores.
    Tiny,
    /// 96 px, patch 8, width 192, 4+4 layers.
    Small,
    /// ViT-B/16 shapes: 224 px, patch 16, width 768, 12 layers; text width 512, 12 layers.
    VitB16,
}

impl Preset {
    pub fn shape(self, vocab_size: usize) -> ClipShape {
        let (vision, text, embed) = match self {
            Preset::Tiny => (
                VisionShape { image_size: 64, patch_size: 8, width: 64, layers: 2, heads: 4, mlp_dim: 256 },
                TextShape { vocab_size, context_length: 32, width: 64, layers: 2, heads: 4, mlp_dim: 256 },
                64,
            ),
            Preset::Small => (
                VisionShape { image_size: 96, patch_size: 8, width: 192, layers: 4, heads: 3, mlp_dim: 768 },
                TextShape { vocab_size, context_length: 32, width: 192, layers: 4, heads: 3, mlp_dim: 768 },
                192,
            ),
            Preset::VitB16 => (
                VisionShape { image_size: 224, patch_size: 16, width: 768, layers: 12, heads: 12, mlp_dim: 3072 },
                TextShape { vocab_size, context_length: 77, width: 512, layers: 12, heads: 8, mlp_dim: 2048 },
                512,
            ),
        };
        ClipShape { vision, text, embed_dim: embed, activation: Activation::QuickGelu, eos_token_id: None }
    }
}

/// Shape overrides for one tower; unset keys come from the preset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TowerOverrides {
    /// Image side in pixels (image tower only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub image_size: Option<u32>,
    /// Patch side in pixels (image tower only); must divide image_size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub patch_size: Option<u32>,
    /// Tokens per text (text tower only), the eos included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2))]
    pub context_length: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub layers: Option<u32>,
    /// Attention heads; must divide width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub heads: Option<u32>,
    /// Hidden width of the MLPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub mlp_dim: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Named shapes to start from.
    #[serde(default = "default_preset")]
    pub preset: Preset,
    /// Image tower shape overrides.
    #[serde(default)]
    pub vision: TowerOverrides,
    /// Text tower shape overrides.
    #[serde(default)]
    pub text: TowerOverrides,
    /// Width of the shared embedding space (default: the preset's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub embed_dim: Option<u32>,
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// The student's `tokenizer.json`, or a directory holding one (a teacher's, usually); its
    /// vocabulary sets the token table, its eos token is where texts are pooled.
    pub tokenizer: String,
    /// Start from a Hugging Face CLIP's weights: a directory with `model.safetensors` and
    /// `config.json` (a teacher's, when you have it). A smaller student inherits as TinyCLIP
    /// does: evenly spaced layers, the leading slice of every width and the first heads. Needs
    /// the same patch size and image size. Ignored when resuming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

fn default_preset() -> Preset {
    Preset::Tiny
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}

/// How the losses are applied (MobileCLIP's `DRClipLoss` or one caption per sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossMode {
    /// One caption per sample: a synthetic one with probability `data.synthetic_prob`, else the
    /// alt-text; one contrastive + distillation loss.
    Mix,
    /// MobileCLIP's DR loss: the alt-text batch and a synthetic-caption batch each get
    /// contrastive + distillation terms, summed.
    Dr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    #[serde(default = "default_loss_mode")]
    pub mode: LossMode,
    /// w_c: weight of the contrastive (InfoNCE) term.
    #[serde(default = "default_contrastive_weight")]
    #[schemars(range(min = 0.0))]
    pub contrastive_weight: f64,
    /// w_d: weight of the distillation term; 0 is plain CLIP training.
    #[serde(default = "default_distill_weight")]
    #[schemars(range(min = 0.0))]
    pub distill_weight: f64,
    /// Logit scale of each teacher, in the shards' `recap.teachers` order; one value applies to
    /// every teacher (MobileCLIP v1: 100; v2: 70 and 60).
    #[serde(default = "default_teacher_scales")]
    #[schemars(length(min = 1))]
    pub teacher_scales: Vec<f64>,
}

fn default_loss_mode() -> LossMode {
    LossMode::Mix
}
fn default_contrastive_weight() -> f64 {
    1.0
}
fn default_distill_weight() -> f64 {
    1.0
}
fn default_teacher_scales() -> Vec<f64> {
    vec![100.0]
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            mode: default_loss_mode(),
            contrastive_weight: default_contrastive_weight(),
            distill_weight: default_distill_weight(),
            teacher_scales: default_teacher_scales(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0))]
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub min_lr: f64,
    /// Decoupled weight decay, on weight matrices only (not biases, norms, position tables, the
    /// class token or the logit scale).
    #[serde(default = "default_weight_decay")]
    #[schemars(range(min = 0.0))]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    #[schemars(range(min = 0.0))]
    pub eps: f64,
    /// Steps of linear warmup before the cosine.
    #[serde(default = "default_warmup")]
    pub warmup_steps: u64,
    /// Clip gradients to this global L2 norm; null for no clipping.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
}

fn default_lr() -> f64 {
    5e-4
}
fn default_weight_decay() -> f64 {
    0.2
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.98
}
fn default_eps() -> f64 {
    1e-6
}
fn default_warmup() -> u64 {
    100
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: default_lr(),
            min_lr: 0.0,
            weight_decay: default_weight_decay(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            warmup_steps: default_warmup(),
            grad_clip: default_grad_clip(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainLoopConfig {
    /// Samples per step.
    #[serde(default = "default_batch")]
    #[schemars(range(min = 2))]
    pub batch_size: u32,
    /// Optimiser steps; when null, `epochs` passes over the ok rows.
    #[serde(default = "default_steps")]
    pub steps: Option<u64>,
    /// Passes over the data, used when `steps` is null.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Seeds the initial weights, the data order, the views and the captions.
    #[serde(default)]
    pub seed: u64,
    /// CPU threads for the model's maths; 0 = one per core.
    #[serde(default)]
    pub threads: u32,
    /// `cpu`, or `cuda` / `cuda:N` (needs recap built with `--features cuda`, which needs nvcc).
    #[serde(default = "default_device")]
    #[schemars(regex(pattern = r"^(cpu|cuda(:[0-9]+)?)$"))]
    pub device: String,
    /// Write a metrics line every N steps.
    #[serde(default = "default_log_every")]
    #[schemars(range(min = 1))]
    pub log_every: u64,
    /// Write a checkpoint every N steps (and at the end); 0 = only at the end.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk (the newest).
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1))]
    pub keep_checkpoints: u32,
    /// Measure the held-out loss (`data.eval_shards`) and zero-shot accuracy (`data.eval_set`)
    /// every N steps (and at the last); 0 = never.
    #[serde(default)]
    pub eval_every: u64,
    /// Held-out samples measured each time.
    #[serde(default = "default_eval_samples")]
    #[schemars(range(min = 2))]
    pub eval_samples: u32,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_batch() -> u32 {
    64
}
fn default_steps() -> Option<u64> {
    Some(1000)
}
fn default_log_every() -> u64 {
    10
}
fn default_checkpoint_every() -> u64 {
    500
}
fn default_keep() -> u32 {
    2
}
fn default_eval_samples() -> u32 {
    256
}

impl Default for TrainLoopConfig {
    fn default() -> Self {
        TrainLoopConfig {
            batch_size: default_batch(),
            steps: default_steps(),
            epochs: None,
            seed: 0,
            threads: 0,
            device: default_device(),
            log_every: default_log_every(),
            checkpoint_every: default_checkpoint_every(),
            keep_checkpoints: default_keep(),
            eval_every: 0,
            eval_samples: default_eval_samples(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainOutputConfig {
    /// Run directory: `checkpoints/`, `metrics.jsonl`, `summary.json`, and `model/` (a Hugging
    /// Face CLIP layout: config.json, model.safetensors, tokenizer.json, preprocessor_config.json).
    pub dir: String,
}

/// The training file's JSON Schema, generated from the config structs.
pub fn json_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(TrainConfig)).expect("schema serialises")
}

/// Pretty JSON text of [`json_schema`], exactly as committed in `schemas/train.schema.json`.
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).expect("schema serialises");
    s.push('\n');
    s
}

/// When the file has schema problems, the shards and the tokenizer it names (where their keys are
/// sound) are still opened, so one `recap validate` shows every problem.
fn files_beside(value: &Value, found: &[Problem]) -> Vec<Problem> {
    let sound = |path: &str| !found.iter().any(|p| p.path == path || path.starts_with(&format!("{}.", p.path)) || p.path.is_empty());
    let mut out = Vec::new();
    for key in ["shards", "eval_shards"] {
        let path = format!("data.{key}");
        if let Some(spec) = value.get("data").and_then(|d| d.get(key)).and_then(Value::as_str) {
            if sound(&path) {
                if let Err(e) = super::data::ShardSet::open(spec) {
                    out.push(Problem { path, message: e.to_string() });
                }
            }
        }
    }
    if let Some(t) = value.get("model").and_then(|m| m.get("tokenizer")).and_then(Value::as_str) {
        let p = Path::new(t);
        let file = if p.is_dir() { p.join("tokenizer.json") } else { p.to_path_buf() };
        if sound("model.tokenizer") && !file.is_file() {
            out.push(Problem { path: "model.tokenizer".into(), message: format!("{t:?} is not a tokenizer.json or a directory holding one") });
        }
    }
    out
}

/// Read a training file with its overrides: schema-checked, typed, not yet planned.
pub fn parse_file(path: &Path, overrides: &[String]) -> Result<TrainConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read training file", path, e))?;
    parse_str(&text, &path.display().to_string(), overrides)
}

pub fn parse_str(text: &str, label: &str, overrides: &[String]) -> Result<TrainConfig> {
    crate::config::parse_yaml(text, label, overrides, &json_schema(), "data, model and output (see `recap schema train`)", files_beside)
}

/// Whether a YAML file is a training file (has `model` and `data`, no `input`).
pub fn looks_like_training(text: &str) -> bool {
    let v: Value = serde_saphyr::from_str(text).unwrap_or(Value::Null);
    v.get("data").is_some() && v.get("model").is_some() && v.get("input").is_none()
}

impl TrainConfig {
    /// The student's shape: preset, overrides, and the tokenizer's vocabulary and eos id.
    pub fn shape(&self, vocab_size: usize, eos: Option<u32>) -> ClipShape {
        let m = &self.model;
        let mut s = m.preset.shape(vocab_size);
        let o = |x: Option<u32>, d: &mut usize| {
            if let Some(x) = x {
                *d = x as usize;
            }
        };
        o(m.vision.image_size, &mut s.vision.image_size);
        o(m.vision.patch_size, &mut s.vision.patch_size);
        o(m.vision.width, &mut s.vision.width);
        o(m.vision.layers, &mut s.vision.layers);
        o(m.vision.heads, &mut s.vision.heads);
        o(m.vision.mlp_dim, &mut s.vision.mlp_dim);
        o(m.text.context_length, &mut s.text.context_length);
        o(m.text.width, &mut s.text.width);
        o(m.text.layers, &mut s.text.layers);
        o(m.text.heads, &mut s.text.heads);
        o(m.text.mlp_dim, &mut s.text.mlp_dim);
        o(m.embed_dim, &mut s.embed_dim);
        s.activation = m.activation;
        s.eos_token_id = eos;
        s
    }

    /// Checks the schema cannot express, on the typed config (no files opened).
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut add = |path: &str, message: String| p.push(Problem { path: path.into(), message });
        for (k, v) in [("model.vision", &self.model.vision), ("model.text", &self.model.text)] {
            if k == "model.vision" && v.context_length.is_some() {
                add("model.vision.context_length", "applies to the text tower; expected model.text.context_length".into());
            }
            if k == "model.text" && (v.image_size.is_some() || v.patch_size.is_some()) {
                add("model.text", "image_size and patch_size apply to the image tower; expected them under model.vision".into());
            }
        }
        for (k, msg) in self.shape(1, None).problems() {
            add(&format!("model.{k}"), msg);
        }
        match (self.train.steps, self.train.epochs) {
            (None, None) => add("train.steps", "null and train.epochs is not set; expected a number of steps or of epochs".into()),
            (Some(0), _) => add("train.steps", "0; expected at least 1".into()),
            (None, Some(e)) if e.is_nan() || e <= 0.0 => add("train.epochs", format!("{e}; expected more than 0")),
            _ => {}
        }
        if self.optim.min_lr > self.optim.lr {
            add("optim.min_lr", format!("{} is more than optim.lr ({})", self.optim.min_lr, self.optim.lr));
        }
        if self.loss.contrastive_weight == 0.0 && self.loss.distill_weight == 0.0 {
            add("loss", "contrastive_weight and distill_weight are both 0; nothing would be trained".into());
        }
        if self.train.eval_every > 0 && self.data.eval_shards.is_none() && self.data.eval_set.is_none() {
            add("train.eval_every", "is set but neither data.eval_shards nor data.eval_set is; expected something held out to measure".into());
        }
        if self.output.dir.trim().is_empty() {
            add("output.dir", "empty; expected a directory".into());
        }
        p
    }

    /// The tokenizer file the config names.
    pub fn tokenizer_path(&self) -> PathBuf {
        let p = PathBuf::from(&self.model.tokenizer);
        if p.is_dir() {
            p.join("tokenizer.json")
        } else {
            p
        }
    }
}

/// Turn problems into the config error for `label`.
pub fn config_error(label: &str, problems: Vec<Problem>) -> Error {
    Error::Config { file: label.to_string(), problems: Problems(problems) }
}
