//! `recap finetune`: dense heads (segmentation or depth) on a trained student's patch tokens,
//! with the encoder frozen (a probe) or finetuned at its own, lower learning rate, on a label
//! budget (a seeded fraction of the dense training set) so that data efficiency can be measured.
//!
//! Heads (after the dense probes of the CLIP-with-quality-captions and MAE papers):
//! - `linear`: one linear map per patch token, upsampled bilinearly to the input size;
//! - `decoder`: per-patch linear + quick_gelu, ×2 bilinear upsampling, a 3×3 convolution + ReLU,
//!   a 1×1 convolution, bilinear to the input size.
//!
//! Losses: per-pixel cross-entropy (ignoring the dataset's ignore index) for segmentation; for
//! depth the head predicts log-depth, trained with L1 on depth or the scale-invariant log loss
//! (Eigen et al. 2014, λ = 0.85) as is usual on NYUv2.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use rand::SeedableRng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::dense::{DenseRow, DenseSet};
use super::dense_metrics::{Confusion, DepthErrors, DepthScores, SegScores};
use super::eval::{mask_to_input, StudentModel};
use super::model::{ce, Clip};
use super::optim::{cosine_lr, AdamW, AdamWSettings};
use crate::error::{Error, Problem, Result};

/// A finetuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "recap finetuning run")]
pub struct FinetuneConfig {
    pub data: DenseDataConfig,
    /// The student to finetune: a `recap train` run directory, its `model/`, or any Hugging Face
    /// CLIP directory (model.safetensors + config.json).
    pub student: String,
    pub task: DenseTask,
    #[serde(default)]
    pub head: HeadConfig,
    #[serde(default = "default_mode")]
    pub mode: FinetuneMode,
    #[serde(default)]
    pub optim: FinetuneOptim,
    #[serde(default)]
    pub train: FinetuneLoop,
    pub output: super::config::TrainOutputConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DenseDataConfig {
    /// Dense training set (dense.parquet; `recap synth` writes one per world).
    pub train: String,
    /// Held-out dense set, measured every `train.eval_every` steps and at the end.
    #[serde(default)]
    pub eval: Option<String>,
    /// Label budget: the share of the labelled training images used, drawn with `train.seed`.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub fraction: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DenseTask {
    Segmentation,
    Depth,
}

impl DenseTask {
    /// Whether a row carries this task's label (a mask, or a depth map).
    pub fn labels(self, r: &DenseRow) -> bool {
        match self {
            DenseTask::Segmentation => r.mask.is_some(),
            DenseTask::Depth => r.depth.is_some(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    Linear,
    Decoder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DepthLoss {
    L1,
    Silog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMode {
    /// The encoder is not trained (a probe of its features).
    Frozen,
    /// The encoder is trained too, at `optim.encoder_lr`.
    Full,
}

fn default_mode() -> FinetuneMode {
    FinetuneMode::Frozen
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    #[serde(default = "default_head_kind")]
    pub kind: HeadKind,
    /// Hidden width of the decoder head.
    #[serde(default = "default_hidden")]
    #[schemars(range(min = 1))]
    pub hidden: u32,
    #[serde(default = "default_depth_loss")]
    pub depth_loss: DepthLoss,
}

fn default_head_kind() -> HeadKind {
    HeadKind::Linear
}
fn default_hidden() -> u32 {
    64
}
fn default_depth_loss() -> DepthLoss {
    DepthLoss::Silog
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig { kind: default_head_kind(), hidden: default_hidden(), depth_loss: default_depth_loss() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneOptim {
    /// Learning rate of the head.
    #[serde(default = "default_head_lr")]
    pub lr: f64,
    /// Learning rate of the encoder in `mode: full`.
    #[serde(default = "default_encoder_lr")]
    pub encoder_lr: f64,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_warmup")]
    pub warmup_steps: u64,
    #[serde(default = "default_clip")]
    pub grad_clip: Option<f64>,
}

fn default_head_lr() -> f64 {
    1e-3
}
fn default_encoder_lr() -> f64 {
    1e-4
}
fn default_wd() -> f64 {
    0.01
}
fn default_warmup() -> u64 {
    20
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}

impl Default for FinetuneOptim {
    fn default() -> Self {
        FinetuneOptim { lr: default_head_lr(), encoder_lr: default_encoder_lr(), weight_decay: default_wd(), warmup_steps: default_warmup(), grad_clip: default_clip() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneLoop {
    #[serde(default = "default_ft_batch")]
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    #[serde(default = "default_ft_steps")]
    #[schemars(range(min = 1))]
    pub steps: u64,
    #[serde(default)]
    pub seed: u64,
    /// CPU threads for the maths; 0 = one per core.
    #[serde(default)]
    pub threads: u32,
    #[serde(default = "default_log")]
    #[schemars(range(min = 1))]
    pub log_every: u64,
    /// Measure `data.eval` every N steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub eval_every: u64,
    /// Write a checkpoint (head, encoder when it trains, optimiser moments, step) every N steps
    /// and at the end; `recap finetune --resume` continues from the last one. 0 = only at the end.
    #[serde(default = "default_ft_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1))]
    pub keep_checkpoints: u32,
}

fn default_ft_checkpoint_every() -> u64 {
    100
}
fn default_keep() -> u32 {
    2
}

fn default_ft_batch() -> u32 {
    16
}
fn default_ft_steps() -> u64 {
    300
}
fn default_log() -> u64 {
    10
}

impl Default for FinetuneLoop {
    fn default() -> Self {
        FinetuneLoop {
            batch_size: default_ft_batch(),
            steps: default_ft_steps(),
            seed: 0,
            threads: 0,
            log_every: default_log(),
            eval_every: 0,
            checkpoint_every: default_ft_checkpoint_every(),
            keep_checkpoints: default_keep(),
        }
    }
}

pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(FinetuneConfig)).expect("schema serialises")
}

pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).expect("schema serialises");
    s.push('\n');
    s
}

fn nothing_beside(_: &serde_json::Value, _: &[Problem]) -> Vec<Problem> {
    Vec::new()
}

pub fn parse_str(text: &str, label: &str, overrides: &[String]) -> Result<FinetuneConfig> {
    crate::config::parse_yaml(text, label, overrides, &json_schema(), "data, student, task and output (see `recap schema finetune`)", nothing_beside)
}

/// Whether a YAML file is a finetuning file (has `student` and `task`).
pub fn looks_like_finetune(text: &str) -> bool {
    let v: serde_json::Value = serde_saphyr::from_str(text).unwrap_or(serde_json::Value::Null);
    v.get("student").is_some() && v.get("task").is_some()
}

/// A dense head's weights, by name.
pub struct Head {
    pub kind: HeadKind,
    pub out: usize,
    pub vars: BTreeMap<String, Var>,
}

fn randn(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand_distr::Distribution;
    let d = rand_distr::Normal::new(0.0f32, std).expect("finite");
    (0..n).map(|_| d.sample(rng)).collect()
}

impl Head {
    pub fn init(kind: HeadKind, width: usize, hidden: usize, out: usize, seed: u64, dev: &Device) -> Result<Head> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x4EAD);
        let mut vars = BTreeMap::new();
        let mut add = |name: &str, dims: &[usize], v: Vec<f32>| -> Result<()> {
            let t = Tensor::from_vec(v, dims, dev).map_err(ce(name))?;
            vars.insert(name.to_string(), Var::from_tensor(&t).map_err(ce(name))?);
            Ok(())
        };
        match kind {
            HeadKind::Linear => {
                // Output layers start small (std 0.01, as MAE's linear probe): the first predictions
                // are the bias, i.e. uniform classes or the mean log-depth.
                add("head.proj.weight", &[out, width], randn(&mut rng, out * width, 0.01))?;
                add("head.proj.bias", &[out], vec![0.0; out])?;
            }
            HeadKind::Decoder => {
                add("head.fc.weight", &[hidden, width], randn(&mut rng, hidden * width, (width as f32).powf(-0.5)))?;
                add("head.fc.bias", &[hidden], vec![0.0; hidden])?;
                add("head.conv.weight", &[hidden, hidden, 3, 3], randn(&mut rng, hidden * hidden * 9, ((9 * hidden) as f32).powf(-0.5)))?;
                add("head.conv.bias", &[hidden], vec![0.0; hidden])?;
                add("head.out.weight", &[out, hidden, 1, 1], randn(&mut rng, out * hidden, 0.01))?;
                add("head.out.bias", &[out], vec![0.0; out])?;
            }
        }
        Ok(Head { kind, out, vars })
    }

    /// Write the head's weights (safetensors, by name).
    pub fn save(&self, path: &Path) -> Result<()> {
        let heads: std::collections::HashMap<String, Tensor> = self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&heads, path).map_err(|e| Error::model(path, format!("cannot write: {e}")))
    }

    /// Set the weights from a file [`Head::save`] wrote, checking every name and shape.
    pub fn load(&self, path: &Path) -> Result<()> {
        let t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::model(path, format!("cannot read: {e}")))?;
        for (k, v) in &self.vars {
            let x = t.get(k).ok_or_else(|| Error::model(path, format!("{k} is missing; expected a {:?} head", self.kind)))?;
            if x.dims() != v.dims() {
                return Err(Error::model(path, format!("{k} has shape {:?}, expected {:?}: a head of another student, task or dataset", x.dims(), v.dims())));
            }
            v.set(x).map_err(ce(k))?;
        }
        Ok(())
    }

    /// Set every output channel's bias (a depth head's starting log-depth).
    pub fn set_output_bias(&self, v: f32) -> Result<()> {
        let name = match self.kind {
            HeadKind::Linear => "head.proj.bias",
            HeadKind::Decoder => "head.out.bias",
        };
        let var = &self.vars[name];
        var.set(&Tensor::from_vec(vec![v; self.out], self.out, var.device()).map_err(ce(name))?).map_err(ce(name))
    }

    fn get(&self, n: &str) -> Result<Tensor> {
        self.vars.get(n).map(|v| v.as_tensor().clone()).ok_or_else(|| Error::Internal(format!("no head parameter {n}")))
    }

    /// Patch tokens [B, N, width] on a g×g grid → per-pixel outputs [B, out, size, size].
    pub fn forward(&self, tokens: &Tensor, grid: usize, size: usize) -> Result<Tensor> {
        let (b, n, _) = tokens.dims3().map_err(ce("tokens"))?;
        debug_assert_eq!(n, grid * grid);
        let to_grid = |x: Tensor, c: usize| -> Result<Tensor> { x.transpose(1, 2).and_then(|x| x.reshape((b, c, grid, grid))).map_err(ce("grid")) };
        let y = match self.kind {
            HeadKind::Linear => {
                let y = super::ops::linear(tokens, &self.get("head.proj.weight")?, &self.get("head.proj.bias")?).map_err(ce("head"))?;
                to_grid(y, self.out)?
            }
            HeadKind::Decoder => {
                let h = self.get("head.fc.weight")?.dim(0).map_err(ce("hidden"))?;
                let y = super::ops::linear(tokens, &self.get("head.fc.weight")?, &self.get("head.fc.bias")?).map_err(ce("head"))?;
                let y = super::ops::quick_gelu(&y).map_err(ce("head"))?;
                let y = to_grid(y, h)?;
                let g2 = grid * 2;
                let y = super::ops::upsample_bilinear(&y, (g2, g2)).map_err(ce("upsample"))?;
                // The convolutions as matrix products, channel-last (candle's conv2d backward is
                // slow on CPU): 3×3 + ReLU, then 1×1.
                let y = super::ops::conv3x3_channels_last(&y, &self.get("head.conv.weight")?, &self.get("head.conv.bias")?).map_err(ce("conv"))?;
                let y = y.relu().map_err(ce("relu"))?;
                let w = self.get("head.out.weight")?.reshape((self.out, h)).map_err(ce("conv"))?;
                let y = super::ops::linear(&y, &w, &self.get("head.out.bias")?).map_err(ce("conv"))?;
                y.transpose(1, 2).and_then(|y| y.reshape((b, self.out, g2, g2))).map_err(ce("grid"))?
            }
        };
        super::ops::upsample_bilinear(&y, (size, size)).map_err(ce("upsample"))
    }
}

/// The encoder's patch tokens (class token dropped, post-layernorm applied): [B, N, width].
pub fn patch_tokens(clip: &Clip, pixels: &Tensor) -> Result<Tensor> {
    let (x, _) = clip.image_tokens(pixels)?;
    let n = x.dim(1).map_err(ce("tokens"))?;
    let p = x.narrow(1, 1, n - 1).map_err(ce("patches"))?;
    clip.post_layernorm(&p.contiguous().map_err(ce("patches"))?)
}

/// Per-pixel cross-entropy over valid pixels. `logits` [B, C, S, S]; `labels` B·S·S class
/// indices; `ignore` skipped.
pub fn segmentation_loss(logits: &Tensor, labels: &[u32], ignore: Option<u32>) -> Result<Tensor> {
    let c = logits.dim(1).map_err(ce("logits"))? as u32;
    // The ignore index (and anything that is not a class) is skipped by the loss.
    let labels: Vec<u32> = labels.iter().map(|&l| if Some(l) == ignore { u32::MAX } else if l < c { l } else { u32::MAX }).collect();
    if logits.device().is_cpu() {
        return super::ops::pixel_cross_entropy(logits, labels).map_err(ce("cross-entropy"));
    }
    let (b, c, s, _) = logits.dims4().map_err(ce("logits"))?;
    let flat = logits.permute((0, 2, 3, 1)).and_then(|x| x.reshape((b * s * s, c))).map_err(ce("logits"))?;
    let lsm = candle_nn::ops::log_softmax(&flat, D::Minus1).map_err(ce("log_softmax"))?;
    let valid: Vec<f32> = labels.iter().map(|&l| if (l as usize) < c { 1.0 } else { 0.0 }).collect();
    let idx: Vec<u32> = labels.iter().map(|&l| if (l as usize) < c { l } else { 0 }).collect();
    let n = valid.iter().sum::<f32>().max(1.0);
    let idx = Tensor::from_vec(idx, (b * s * s, 1), logits.device()).map_err(ce("labels"))?;
    let valid = Tensor::from_vec(valid, b * s * s, logits.device()).map_err(ce("labels"))?;
    let picked = lsm.gather(&idx, 1).and_then(|x| x.squeeze(1)).map_err(ce("gather"))?;
    (picked * valid).and_then(|x| x.sum_all()).and_then(|x| x.affine(-1.0 / n as f64, 0.0)).map_err(ce("loss"))
}

/// Depth loss on log-depth predictions [B, 1, S, S] against depth in metres (0 = no measurement).
pub fn depth_loss(log_pred: &Tensor, truth: &[f32], kind: DepthLoss) -> Result<Tensor> {
    let dev = log_pred.device();
    let n_all = truth.len();
    let valid: Vec<f32> = truth.iter().map(|&t| if t > 0.0 && t.is_finite() { 1.0 } else { 0.0 }).collect();
    let n = valid.iter().sum::<f32>().max(1.0) as f64;
    let p = log_pred.flatten_all().map_err(ce("pred"))?;
    let valid_t = Tensor::from_vec(valid, n_all, dev).map_err(ce("valid"))?;
    match kind {
        DepthLoss::L1 => {
            let t = Tensor::from_vec(truth.to_vec(), n_all, dev).map_err(ce("truth"))?;
            (p.exp().map_err(ce("exp"))? - t).and_then(|d| d.abs()).and_then(|d| d * valid_t).and_then(|d| d.sum_all()).and_then(|d| d.affine(1.0 / n, 0.0)).map_err(ce("l1"))
        }
        DepthLoss::Silog => {
            let lt: Vec<f32> = truth.iter().map(|&t| if t > 0.0 && t.is_finite() { t.ln() } else { 0.0 }).collect();
            let lt = Tensor::from_vec(lt, n_all, dev).map_err(ce("truth"))?;
            let d = (p - lt).and_then(|d| d * valid_t).map_err(ce("silog"))?;
            let mean_sq = d.sqr().and_then(|x| x.sum_all()).and_then(|x| x.affine(1.0 / n, 0.0)).map_err(ce("silog"))?;
            let mean = d.sum_all().and_then(|x| x.affine(1.0 / n, 0.0)).map_err(ce("silog"))?;
            (mean_sq - (mean.sqr().map_err(ce("silog"))? * 0.85).map_err(ce("silog"))?).and_then(|x| (x + 1e-8)?.sqrt()).map_err(ce("silog"))
        }
    }
}

/// A depth map through the model's resize (nearest) and centre crop.
pub fn depth_to_input(depth: &[f32], w: u32, h: u32, s: usize) -> Vec<f32> {
    // The same index map as masks: values are carried, not blended.
    let idx: Vec<u32> = (0..depth.len() as u32).collect();
    mask_to_input(&idx, w, h, s).into_iter().map(|i| depth[i as usize]).collect()
}

/// Dense scores of a finetuned head on a dense set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DenseHeadScores {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<SegScores>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<DepthScores>,
    pub images: usize,
}

/// The finetuning state: student, head, their optimisers.
pub struct Finetuner {
    pub student: StudentModel,
    pub head: Head,
    pub task: DenseTask,
    pub mode: FinetuneMode,
    pub depth_loss: DepthLoss,
    pub classes: Vec<String>,
    pub ignore: Option<u32>,
    head_opt: AdamW,
    enc_opt: Option<AdamW>,
}

/// One prepared batch: pixels and per-pixel targets at the model's input size.
pub struct DenseBatch {
    pub pixels: Tensor,
    pub labels: Vec<u32>,
    pub depth: Vec<f32>,
}

impl Finetuner {
    pub fn new(mut student: StudentModel, cfg: &FinetuneConfig, spec: &super::dense::DenseSpec) -> Result<Finetuner> {
        student.clip.params.frozen = cfg.mode == FinetuneMode::Frozen;
        let out = match cfg.task {
            DenseTask::Segmentation => spec.classes.len(),
            DenseTask::Depth => 1,
        };
        let width = student.clip.shape.vision.width;
        let head = Head::init(cfg.head.kind, width, cfg.head.hidden as usize, out, cfg.train.seed, &Device::Cpu)?;
        let settings = AdamWSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.optim.weight_decay };
        let head_opt = AdamW::new(head.vars.iter().map(|(k, v)| (k.clone(), v.clone(), v.rank() >= 2)), settings)?;
        let enc_opt = match cfg.mode {
            FinetuneMode::Frozen => None,
            FinetuneMode::Full => Some(AdamW::new(
                student.clip.params.vars.iter().map(|(k, v)| (k.clone(), v.clone(), super::model::Params::decays(k, v.as_tensor()))),
                settings,
            )?),
        };
        Ok(Finetuner {
            student,
            head,
            task: cfg.task,
            mode: cfg.mode,
            depth_loss: cfg.head.depth_loss,
            classes: spec.classes.clone(),
            ignore: spec.ignore_index,
            head_opt,
            enc_opt,
        })
    }

    fn size(&self) -> usize {
        self.student.clip.shape.vision.image_size
    }

    /// Decode and align a set of rows.
    pub fn batch(&self, rows: &[&DenseRow], set_path: &Path) -> Result<DenseBatch> {
        let s = self.size();
        let imgs: Vec<image::RgbImage> = rows
            .iter()
            .map(|r| image::load_from_memory(&r.image).map(|i| i.to_rgb8()).map_err(|e| Error::input(set_path, format!("{}: the image does not decode: {e}", r.path))))
            .collect::<Result<_>>()?;
        let refs: Vec<&image::RgbImage> = imgs.iter().collect();
        let px = self.student.processor.batch(&refs, (s as u32, s as u32)).map_err(|e| Error::Internal(format!("preprocessing: {e}")))?;
        let pixels = Tensor::from_vec(px, (rows.len(), 3, s, s), &Device::Cpu).map_err(ce("pixels"))?;
        let mut labels = Vec::new();
        let mut depth = Vec::new();
        for r in rows {
            if let Some(m) = &r.mask {
                labels.extend(mask_to_input(m, r.width, r.height, s));
            } else {
                labels.extend(std::iter::repeat_n(u32::MAX, s * s));
            }
            if let Some(d) = &r.depth {
                depth.extend(depth_to_input(d, r.width, r.height, s));
            } else {
                depth.extend(std::iter::repeat_n(0.0, s * s));
            }
        }
        Ok(DenseBatch { pixels, labels, depth })
    }

    fn outputs(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut tokens = patch_tokens(&self.student.clip, pixels)?;
        if self.mode == FinetuneMode::Frozen {
            // No gradient flows into (or is computed for) the encoder.
            tokens = tokens.detach();
        }
        let grid = self.size() / self.student.clip.shape.vision.patch_size;
        self.head.forward(&tokens, grid, self.size())
    }

    fn loss(&self, b: &DenseBatch) -> Result<Tensor> {
        let y = self.outputs(&b.pixels)?;
        match self.task {
            DenseTask::Segmentation => segmentation_loss(&y, &b.labels, self.ignore),
            DenseTask::Depth => depth_loss(&y, &b.depth, self.depth_loss),
        }
    }

    /// One step; returns the loss.
    pub fn step(&mut self, b: &DenseBatch, lr: f64, enc_lr: f64, clip: Option<f64>) -> Result<f32> {
        let loss = self.loss(b)?;
        let value: f32 = loss.to_scalar().map_err(ce("loss"))?;
        if !value.is_finite() {
            return Err(Error::Internal(format!("the finetuning loss is {value} (learning rate {lr:.2e}); lower optim.lr")));
        }
        let grads = loss.backward().map_err(ce("backward"))?;
        let mut norm2 = self.head_opt.grad_norm(&grads)?.powi(2);
        if let Some(e) = &self.enc_opt {
            norm2 += e.grad_norm(&grads)?.powi(2);
        }
        let scale = match clip {
            Some(m) if (norm2.sqrt() as f64) > m => m / (norm2.sqrt() as f64 + 1e-6),
            _ => 1.0,
        };
        self.head_opt.step(&grads, lr, scale)?;
        if let Some(e) = &mut self.enc_opt {
            e.step(&grads, enc_lr, scale)?;
        }
        Ok(value)
    }

    /// Scores on a dense set (its labelled images).
    pub fn evaluate(&self, set: &DenseSet, batch: usize) -> Result<DenseHeadScores> {
        let rows: Vec<&DenseRow> = set.rows.iter().filter(|r| self.task.labels(r)).collect();
        let mut conf = Confusion::new(self.classes.len(), self.ignore);
        let mut derr = DepthErrors::default();
        for chunk in rows.chunks(batch.max(1)) {
            let b = self.batch(chunk, &set.path)?;
            let y = self.outputs(&b.pixels)?.detach();
            match self.task {
                DenseTask::Segmentation => {
                    let pred: Vec<u32> = y.argmax(1).and_then(|p| p.flatten_all()).and_then(|p| p.to_vec1()).map_err(ce("argmax"))?;
                    conf.add(&b.labels, &pred);
                }
                DenseTask::Depth => {
                    let pred: Vec<f32> = y.exp().and_then(|p| p.flatten_all()).and_then(|p| p.to_vec1()).map_err(ce("depth"))?;
                    derr.add(&b.depth, &pred);
                }
            }
        }
        Ok(DenseHeadScores {
            segmentation: (self.task == DenseTask::Segmentation).then(|| conf.scores(&self.classes)),
            depth: (self.task == DenseTask::Depth).then(|| derr.scores()),
            images: rows.len(),
        })
    }

    /// A finetuned model directory (`recap finetune`'s `model/`: the student, `head.safetensors`
    /// and `finetune.json`), ready to measure.
    pub fn load(dir: &Path) -> Result<Finetuner> {
        let mp = dir.join("finetune.json");
        let text = std::fs::read_to_string(&mp).map_err(|e| Error::io("cannot read", &mp, e))?;
        #[derive(Deserialize)]
        struct Meta {
            task: DenseTask,
            head: HeadConfig,
            classes: Vec<String>,
            ignore_index: Option<u32>,
            mode: FinetuneMode,
        }
        let m: Meta = serde_json::from_str(&text).map_err(|e| Error::model(&mp, format!("not a recap finetune.json: {e}")))?;
        let student = StudentModel::load(dir)?;
        let out = match m.task {
            DenseTask::Segmentation => m.classes.len(),
            DenseTask::Depth => 1,
        };
        let head = Head::init(m.head.kind, student.clip.shape.vision.width, m.head.hidden as usize, out, 0, &Device::Cpu)?;
        head.load(&dir.join("head.safetensors"))?;
        let settings = AdamWSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let head_opt = AdamW::new(std::iter::empty(), settings)?;
        Ok(Finetuner { student, head, task: m.task, mode: m.mode, depth_loss: m.head.depth_loss, classes: m.classes, ignore: m.ignore_index, head_opt, enc_opt: None })
    }

    /// Scores on a dense set, after checking that the set's classes are the head's.
    pub fn evaluate_on(&self, set: &DenseSet, batch: usize) -> Result<DenseHeadScores> {
        if self.task == DenseTask::Segmentation && set.spec.classes != self.classes {
            return Err(Error::input(
                &set.path,
                format!("declares the classes [{}], but the head was trained on [{}]", set.spec.classes.join(", "), self.classes.join(", ")),
            ));
        }
        if !set.rows.iter().any(|r| self.task.labels(r)) {
            return Err(Error::input(&set.path, format!("has no {:?} labels to measure the head on", self.task)));
        }
        self.evaluate(set, batch)
    }

    pub fn save(&self, dir: &Path, cfg: &FinetuneConfig) -> Result<()> {
        super::write_model_dir(&self.student.clip, &self.student.dir, dir)?;
        self.head.save(&dir.join("head.safetensors"))?;
        let meta = serde_json::json!({ "task": cfg.task, "head": cfg.head, "classes": self.classes, "ignore_index": self.ignore, "mode": cfg.mode });
        let mp = dir.join("finetune.json");
        std::fs::write(&mp, serde_json::to_string_pretty(&meta).expect("json")).map_err(|e| Error::io("cannot write", &mp, e))
    }
}

/// A finetuning checkpoint's `state.json`: with the head (and, in `mode: full`, the encoder) and
/// the optimiser moments beside it, everything `--resume` needs to continue with the same next
/// batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FinetuneState {
    pub step: u64,
    pub seed: u64,
    pub task: DenseTask,
    pub mode: FinetuneMode,
    pub head: HeadKind,
    pub fraction: f64,
    pub train_images: usize,
    pub loss: f32,
    pub seconds: f64,
}

impl Finetuner {
    fn save_checkpoint(&self, out: &Path, st: &FinetuneState, keep: usize) -> Result<()> {
        super::write_checkpoint(out, st.step, keep, |tmp| {
            if self.mode == FinetuneMode::Full {
                super::write_model_dir(&self.student.clip, &self.student.dir, tmp)?;
            }
            if let Some(e) = &self.enc_opt {
                e.save(&tmp.join("encoder_optimizer.safetensors"))?;
            }
            self.head.save(&tmp.join("head.safetensors"))?;
            self.head_opt.save(&tmp.join("head_optimizer.safetensors"))?;
            let sp = tmp.join("state.json");
            std::fs::write(&sp, serde_json::to_string_pretty(st).expect("state serialises")).map_err(|e| Error::io("cannot write", &sp, e))
        })
    }

    /// Load a checkpoint's head and optimiser moments (the encoder came with the student).
    fn restore(&mut self, dir: &Path, st: &FinetuneState) -> Result<()> {
        self.head.load(&dir.join("head.safetensors"))?;
        self.head_opt.load(&dir.join("head_optimizer.safetensors"), st.step)?;
        if let Some(e) = &mut self.enc_opt {
            e.load(&dir.join("encoder_optimizer.safetensors"), st.step)?;
        }
        Ok(())
    }
}

/// The training set's order in epoch `epoch`: a pure function of the seed, so a resumed run
/// draws the same batches.
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x0E90_C4 ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut v: Vec<usize> = (0..n).collect();
    super::data::shuffle(&mut rng, &mut v);
    v
}

/// What a finetuning run reports (also `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneSummary {
    pub steps: u64,
    pub train_images: usize,
    pub final_loss: f32,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<DenseHeadScores>,
    pub model_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u64>,
}

/// Run a finetuning file; `resume` continues from the output directory's last checkpoint.
pub fn run(cfg: &FinetuneConfig, label: &str, progress: bool, resume: bool) -> Result<FinetuneSummary> {
    let out = PathBuf::from(&cfg.output.dir);
    let existing = super::checkpoints(&out);
    let resume_from = match existing.last() {
        Some((step, dir)) if !resume => {
            return Err(Error::Usage(format!(
                "{} already holds a run (checkpoint at step {step}, {}); pass --resume to continue it, or choose another output.dir",
                out.display(),
                dir.display()
            )))
        }
        Some((_, dir)) => {
            let sp = dir.join("state.json");
            let text = std::fs::read_to_string(&sp).map_err(|e| Error::io("cannot read", &sp, e))?;
            let st: FinetuneState = serde_json::from_str(&text).map_err(|e| Error::model(&sp, format!("not a recap finetuning checkpoint: {e}")))?;
            let same = (st.seed, st.task, st.mode, st.head, st.fraction) == (cfg.train.seed, cfg.task, cfg.mode, cfg.head.kind, cfg.data.fraction);
            if !same {
                return Err(Error::Usage(format!(
                    "{}: the checkpoint was made with seed {}, task {:?}, mode {:?}, head {:?}, data.fraction {}; the config differs, so resuming would not continue that run",
                    dir.display(),
                    st.seed,
                    st.task,
                    st.mode,
                    st.head,
                    st.fraction
                )));
            }
            Some((st, dir.clone()))
        }
        None => None,
    };
    let mut problems = Vec::new();
    let mut add = |p: &str, e: Error| problems.push(Problem { path: p.into(), message: e.to_string() });
    let train = DenseSet::open(Path::new(&cfg.data.train)).map_err(|e| add("data.train", e)).ok();
    let eval = cfg.data.eval.as_ref().and_then(|p| DenseSet::open(Path::new(p)).map_err(|e| add("data.eval", e)).ok());
    let student_dir = match &resume_from {
        // A full finetune's encoder trains: it comes from the checkpoint.
        Some((_, dir)) if cfg.mode == FinetuneMode::Full => dir.clone(),
        _ => {
            let p = PathBuf::from(&cfg.student);
            if p.join("model").join("model.safetensors").is_file() {
                p.join("model")
            } else {
                p
            }
        }
    };
    let student = StudentModel::load(&student_dir).map_err(|e| add("student", e)).ok();
    if !problems.is_empty() {
        return Err(super::config::config_error(label, problems));
    }
    let (train, student) = (train.expect("checked"), student.expect("checked"));
    let labelled: Vec<&DenseRow> = train.rows.iter().filter(|r| cfg.task.labels(r)).collect();
    if labelled.is_empty() {
        return Err(Error::input(&train.path, format!("has no {:?} labels", cfg.task)));
    }
    // The label budget: a seeded subset.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.train.seed ^ 0xB0D6E7);
    let mut order: Vec<usize> = (0..labelled.len()).collect();
    super::data::shuffle(&mut rng, &mut order);
    let keep = ((labelled.len() as f64 * cfg.data.fraction).round() as usize).clamp(1, labelled.len());
    let subset: Vec<&DenseRow> = order[..keep].iter().map(|&i| labelled[i]).collect();
    super::prepare_cpu(cfg.train.threads);
    let mut ft = Finetuner::new(student, cfg, &train.spec)?;
    if cfg.task == DenseTask::Depth {
        // Start the head at the training set's mean log-depth: the scale-invariant loss learns
        // the absolute scale only slowly (its λ = 0.85 leaves 15% weight on the mean).
        let logs: Vec<f64> = subset.iter().flat_map(|r| r.depth.iter().flatten()).filter(|d| **d > 0.0).map(|d| (*d as f64).ln()).collect();
        if !logs.is_empty() {
            ft.head.set_output_bias((logs.iter().sum::<f64>() / logs.len() as f64) as f32)?;
        }
    }
    let (first, seconds0) = match &resume_from {
        Some((st, dir)) => {
            ft.restore(dir, st)?;
            (st.step, st.seconds)
        }
        None => (0, 0.0),
    };
    std::fs::create_dir_all(&out).map_err(|e| Error::io("cannot create", &out, e))?;
    let mp = out.join("metrics.jsonl");
    let mut metrics = if resume_from.is_some() {
        super::truncate_metrics(&mp, first)?;
        std::fs::OpenOptions::new().append(true).create(true).open(&mp)
    } else {
        std::fs::File::create(&mp)
    }
    .map_err(|e| Error::io("cannot open", &mp, e))?;
    let bs = cfg.train.batch_size as usize;
    let per_step = bs.min(subset.len());
    let pb = super::progress_bar(progress, cfg.train.steps, first);
    let t0 = Instant::now();
    let mut order_of: (u64, Vec<usize>) = (u64::MAX, Vec::new());
    let mut last = resume_from.as_ref().map(|(st, _)| st.loss).unwrap_or(f32::NAN);
    let mut last_eval = None;
    for step in first..cfg.train.steps {
        let mut rows = Vec::with_capacity(per_step);
        for i in step * per_step as u64..(step + 1) * per_step as u64 {
            let epoch = i / subset.len() as u64;
            if order_of.0 != epoch {
                order_of = (epoch, epoch_order(cfg.train.seed, epoch, subset.len()));
            }
            rows.push(subset[order_of.1[(i % subset.len() as u64) as usize]]);
        }
        let b = ft.batch(&rows, &train.path)?;
        let o = &cfg.optim;
        let lr = cosine_lr(step, o.lr, 0.0, o.warmup_steps, cfg.train.steps);
        let enc_lr = cosine_lr(step, o.encoder_lr, 0.0, o.warmup_steps, cfg.train.steps);
        last = ft.step(&b, lr, enc_lr, o.grad_clip)?;
        let done = step + 1;
        let eval_now = eval.as_ref().filter(|_| (cfg.train.eval_every > 0 && done % cfg.train.eval_every == 0) || done == cfg.train.steps);
        let scores = match eval_now {
            Some(e) => Some(ft.evaluate(e, 32)?),
            None => None,
        };
        if done % cfg.train.log_every == 0 || done == cfg.train.steps || scores.is_some() {
            let mut line = serde_json::json!({ "step": done, "loss": last, "lr": lr, "encoder_lr": enc_lr, "images_per_s": ((done - first) as usize * per_step) as f64 / t0.elapsed().as_secs_f64() });
            if let Some(s) = &scores {
                line["eval"] = serde_json::to_value(s).expect("json");
            }
            writeln!(metrics, "{line}").map_err(|e| Error::io("cannot write", &mp, e))?;
            pb.set_message(format!("loss {last:.4}"));
        }
        if scores.is_some() {
            last_eval = scores;
        }
        if (cfg.train.checkpoint_every > 0 && done % cfg.train.checkpoint_every == 0) || done == cfg.train.steps {
            let st = FinetuneState {
                step: done,
                seed: cfg.train.seed,
                task: cfg.task,
                mode: cfg.mode,
                head: cfg.head.kind,
                fraction: cfg.data.fraction,
                train_images: subset.len(),
                loss: last,
                seconds: seconds0 + t0.elapsed().as_secs_f64(),
            };
            ft.save_checkpoint(&out, &st, cfg.train.keep_checkpoints as usize)?;
        }
        pb.set_position(done);
    }
    pb.finish_and_clear();
    if last_eval.is_none() {
        // Resumed at the end (or no steps left): measure what the checkpoint holds.
        if let Some(e) = &eval {
            last_eval = Some(ft.evaluate(e, 32)?);
        }
    }
    let model_dir = out.join("model");
    ft.save(&model_dir, cfg)?;
    let s = FinetuneSummary {
        steps: cfg.train.steps,
        train_images: subset.len(),
        final_loss: last,
        seconds: seconds0 + t0.elapsed().as_secs_f64(),
        eval: last_eval,
        model_dir: model_dir.display().to_string(),
        resumed_from: resume_from.map(|(st, _)| st.step),
    };
    let sp = out.join("summary.json");
    std::fs::write(&sp, serde_json::to_string_pretty(&s).expect("json")).map_err(|e| Error::io("cannot write", &sp, e))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Every head tensor, and in `mode: full` every image-tower tensor, gets a non-zero gradient,
    /// for both heads and both tasks.
    #[test]
    fn every_trainable_tensor_gets_a_gradient() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let yaml = std::fs::read_to_string(root.join("pipelines/finetune-tiny.yaml")).unwrap();
        let spec = super::super::dense::DenseSpec {
            version: 1,
            classes: ["background", "circle", "square"].iter().map(|s| s.to_string()).collect(),
            ignore_index: None,
            depth_scale: 0.001,
            depth_unit: None,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for kind in ["linear", "decoder"] {
            for task in ["segmentation", "depth"] {
                let sets = [format!("head.kind={kind}"), format!("task={task}"), "mode=full".to_string()];
                let cfg = parse_str(&yaml, "test", &sets).unwrap();
                let student = StudentModel::load(&root.join("models/shapeworld-clip-a")).unwrap();
                let ft = Finetuner::new(student, &cfg, &spec).unwrap();
                let s = ft.size();
                let px: Vec<f32> = (0..2 * 3 * s * s).map(|_| rng.random_range(-1.5..1.5)).collect();
                let b = DenseBatch {
                    pixels: Tensor::from_vec(px, (2, 3, s, s), &Device::Cpu).unwrap(),
                    labels: (0..2 * s * s).map(|_| rng.random_range(0..3u32)).collect(),
                    depth: (0..2 * s * s).map(|_| rng.random_range(1.0..10.0f32)).collect(),
                };
                let grads = ft.loss(&b).unwrap().backward().unwrap();
                let trained = ft.head.vars.iter().chain(ft.student.clip.params.vars.iter().filter(|(k, _)| k.starts_with("vision_model.")));
                let mut n = 0;
                for (name, v) in trained {
                    let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{kind} {task}: {name} got no gradient"));
                    let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                    assert!(norm > 0.0 && norm.is_finite(), "{kind} {task}: {name} gradient norm² {norm}");
                    n += 1;
                }
                assert!(n > ft.head.vars.len() + 10, "{kind} {task}: only {n} tensors checked");
            }
        }
    }
}
