//! The model stages of a pipeline file: `caption`, `score` and `filter`. Each is optional; a
//! pipeline without them writes plain shards, with them reinforced shards.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

fn default_device() -> String {
    "cpu".into()
}

/// How the captioner picks tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecodingKind {
    /// The most likely token each step (one caption per image).
    Greedy,
    /// Beam search; the `num_captions` best beams are kept.
    Beam,
    /// Top-k / top-p sampling with temperature, seeded per sample.
    Sample,
}

/// When beam search stops (Hugging Face's `early_stopping`: false, true, "never").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStoppingKind {
    Heuristic,
    Finished,
    Never,
}

/// Synthetic captions from an ONNX image-to-text model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptionConfig {
    /// Model directory as `optimum-cli export onnx --task image-to-text-with-past` writes it.
    pub model: String,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs the onnxruntime-gpu library).
    #[serde(default = "default_device")]
    #[schemars(regex(pattern = r"^(cpu|cuda(:[0-9]+)?)$"))]
    pub device: String,
    /// ONNX Runtime threads per operator; 0 lets it choose.
    #[serde(default)]
    pub intra_threads: u32,
    /// Images per batch.
    #[serde(default = "default_caption_batch")]
    #[schemars(range(min = 1, max = 4096))]
    pub batch_size: u32,
    /// Captions per image (DataCompDR: 5).
    #[serde(default = "default_num_captions")]
    #[schemars(range(min = 1, max = 64))]
    pub num_captions: u32,
    #[serde(default = "default_decoding")]
    pub decoding: DecodingKind,
    /// Beams, for `decoding: beam`.
    #[serde(default = "default_beam_width")]
    #[schemars(range(min = 1, max = 64))]
    pub beam_width: u32,
    /// Beam scores are divided by length^length_penalty.
    #[serde(default = "one")]
    pub length_penalty: f32,
    #[serde(default = "default_early_stopping")]
    pub early_stopping: EarlyStoppingKind,
    /// Sampling temperature.
    #[serde(default = "one")]
    #[schemars(range(min = 0.01, max = 100.0))]
    pub temperature: f32,
    /// Keep the k most likely tokens before sampling; 0 keeps all.
    #[serde(default)]
    pub top_k: u32,
    /// Keep the most likely tokens up to this cumulative probability (DataCompDR: 0.9).
    #[serde(default = "default_top_p")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: f32,
    /// Tokens generated at most per caption.
    #[serde(default = "default_max_new_tokens")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_new_tokens: u32,
    /// Cut each caption after its first period.
    #[serde(default)]
    pub cut_at_period: bool,
    /// Sampling seed; each sample's generator is derived from it and the sample's uid.
    #[serde(default)]
    pub seed: u64,
}

fn default_caption_batch() -> u32 {
    32
}
fn default_num_captions() -> u32 {
    5
}
fn default_decoding() -> DecodingKind {
    DecodingKind::Sample
}
fn default_beam_width() -> u32 {
    4
}
fn one() -> f32 {
    1.0
}
fn default_early_stopping() -> EarlyStoppingKind {
    EarlyStoppingKind::Heuristic
}
fn default_top_p() -> f32 {
    0.9
}
fn default_max_new_tokens() -> u32 {
    40
}

/// RandAugment and crop settings of the augmented views.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Smallest crop area, as a fraction of the image.
    #[schemars(range(min = 0.01, max = 1.0))]
    pub min_scale: f64,
    #[schemars(range(min = 0.01, max = 1.0))]
    pub max_scale: f64,
    /// RandAugment operations per view.
    #[schemars(range(max = 8))]
    pub ops: u32,
    /// RandAugment magnitude bin, of 31 (0-30).
    #[schemars(range(max = 30))]
    pub magnitude: u32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig { min_scale: 0.08, max_scale: 1.0, ops: 2, magnitude: 9 }
    }
}

/// Teacher CLIP ensemble: embeddings of the original and augmented views and of every caption,
/// and CLIP scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// CLIP model directories (one `model.onnx`, or image and text encoder files), one per teacher.
    #[schemars(length(min = 1))]
    pub teachers: Vec<String>,
    #[serde(default = "default_device")]
    #[schemars(regex(pattern = r"^(cpu|cuda(:[0-9]+)?)$"))]
    pub device: String,
    #[serde(default)]
    pub intra_threads: u32,
    /// Images (views) or texts per batch.
    #[serde(default = "default_score_batch")]
    #[schemars(range(min = 1, max = 8192))]
    pub batch_size: u32,
    /// Augmented views per image, besides the original (DataCompDR: 30).
    #[serde(default = "default_augmentations")]
    #[schemars(range(max = 256))]
    pub augmentations: u32,
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Seed of the view parameters; each sample's views are drawn from it and the sample's uid.
    #[serde(default)]
    pub seed: u64,
}

fn default_score_batch() -> u32 {
    64
}
fn default_augmentations() -> u32 {
    2
}

/// Which score `top_percent` ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RankBy {
    AltScore,
    BestSyntheticScore,
}

/// Thresholds; rows that fail one stay in the shard with status `filtered` and the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Smallest CLIP score of the alt-text (ensemble mean cosine similarity).
    #[serde(default)]
    pub min_alt_score: Option<f32>,
    /// Smallest CLIP score of the best synthetic caption.
    #[serde(default)]
    pub min_best_synthetic_score: Option<f32>,
    /// Fewest words in the alt-text.
    #[serde(default)]
    pub min_caption_words: Option<u32>,
    /// Most words in the alt-text.
    #[serde(default)]
    pub max_caption_words: Option<u32>,
    /// Smallest shorter side of the original image, in pixels.
    #[serde(default)]
    pub min_image_side: Option<u32>,
    /// Keep only this top percentage of each shard's ok rows by `rank_by` (0-100].
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub top_percent: Option<f64>,
    #[serde(default = "default_rank_by")]
    pub rank_by: RankBy,
    /// A SQL condition over the shard's columns (DataFusion; the embedding functions of
    /// `recap query` included), e.g. `clip_score > 0.28 AND width >= 200`. Applied last, to the
    /// rows as they are about to be written: ok rows for which it is not true are filtered, the
    /// condition as the reason.
    #[serde(default)]
    pub sql: Option<String>,
}

fn default_rank_by() -> RankBy {
    RankBy::AltScore
}
