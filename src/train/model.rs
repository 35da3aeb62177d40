//! The student: a CLIP (Radford et al. 2021, <https://arxiv.org/abs/2103.00020>) in candle, laid
//! out and named as Hugging Face's `CLIPModel` (transformers `models/clip/modeling_clip.py`), so
//! its `model.safetensors` maps one to one onto HF CLIP weights and back.
//!
//! Two things differ from candle-transformers' CLIP, both for training (see TRAINING.md):
//! - layer norm is written from primitive ops: candle-nn's fused `LayerNorm` has no backward and
//!   silently cuts the gradient of everything upstream;
//! - the patch embedding is a reshape + matmul instead of conv2d, whose backward always computes an
//!   input gradient through a slow transposed convolution. The weight keeps conv2d's
//!   `[width, 3, patch, patch]` layout on disk.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Wrap a candle error with what was being done.
pub(crate) fn ce(what: impl std::fmt::Display) -> impl FnOnce(candle_core::Error) -> Error {
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// The activation inside the MLPs: OpenAI CLIP's `quick_gelu` (x·σ(1.702x)) or exact `gelu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// Shapes of the image tower (a ViT).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisionShape {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
}

/// Shapes of the text tower (a causal transformer pooled at the end-of-text token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextShape {
    pub vocab_size: usize,
    pub context_length: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
}

/// Everything that fixes the student's tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipShape {
    pub vision: VisionShape,
    pub text: TextShape,
    /// Width of the shared embedding space.
    pub embed_dim: usize,
    pub activation: Activation,
    /// Token id the text tower is pooled at (the first one in a sequence); without it, the last
    /// token is used.
    pub eos_token_id: Option<u32>,
}

impl ClipShape {
    pub fn num_patches(&self) -> usize {
        (self.vision.image_size / self.vision.patch_size).pow(2)
    }

    /// Problems with the shapes, as (key, message) under `model.`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let v = &self.vision;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            p.push(("vision.patch_size".into(), format!("{} does not divide vision.image_size {}", v.patch_size, v.image_size)));
        }
        for (name, width, heads) in [("vision", v.width, v.heads), ("text", self.text.width, self.text.heads)] {
            if heads == 0 || width % heads != 0 {
                p.push((format!("{name}.heads"), format!("{heads} does not divide {name}.width {width}")));
            }
        }
        p
    }

    /// A Hugging Face `config.json` for this shape (`CLIPModel`).
    pub fn hf_config(&self) -> serde_json::Value {
        let act = match self.activation {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
        };
        let mut text = serde_json::json!({
            "model_type": "clip_text_model",
            "hidden_act": act,
            "hidden_size": self.text.width,
            "intermediate_size": self.text.mlp_dim,
            "num_attention_heads": self.text.heads,
            "num_hidden_layers": self.text.layers,
            "max_position_embeddings": self.text.context_length,
            "vocab_size": self.text.vocab_size,
            "layer_norm_eps": LN_EPS,
            "projection_dim": self.embed_dim,
        });
        if let Some(eos) = self.eos_token_id {
            text["eos_token_id"] = eos.into();
        }
        serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.embed_dim,
            "logit_scale_init_value": (1.0f64 / 0.07).ln(),
            "text_config": text,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_act": act,
                "hidden_size": self.vision.width,
                "intermediate_size": self.vision.mlp_dim,
                "num_attention_heads": self.vision.heads,
                "num_hidden_layers": self.vision.layers,
                "image_size": self.vision.image_size,
                "patch_size": self.vision.patch_size,
                "num_channels": 3,
                "layer_norm_eps": LN_EPS,
                "projection_dim": self.embed_dim,
            },
            "recap": { "shape": self },
        })
    }

    /// Read the shape from a Hugging Face CLIP `config.json` (recap's own or a transformers one).
    pub fn from_hf_config(path: &Path) -> Result<ClipShape> {
        let v = crate::models::hf::read_json(path)?;
        if let Some(s) = v.get("recap").and_then(|r| r.get("shape")) {
            return serde_json::from_value(s.clone()).map_err(|e| Error::model(path, format!("recap.shape: {e}")));
        }
        let get = |o: &serde_json::Value, k: &str| -> Result<usize> {
            o.get(k).and_then(serde_json::Value::as_u64).map(|n| n as usize).ok_or_else(|| Error::model(path, format!("no `{k}`")))
        };
        let (vc, tc) = (&v["vision_config"], &v["text_config"]);
        if !vc.is_object() || !tc.is_object() {
            return Err(Error::model(path, "not a CLIP config: `vision_config` and `text_config` are required"));
        }
        let act = match tc.get("hidden_act").and_then(serde_json::Value::as_str).unwrap_or("quick_gelu") {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(Error::model(path, format!("hidden_act {other:?}: expected quick_gelu or gelu"))),
        };
        let ffn = |o: &serde_json::Value, w: usize| o.get("intermediate_size").and_then(serde_json::Value::as_u64).map(|n| n as usize).unwrap_or(4 * w);
        let vw = get(vc, "hidden_size")?;
        let tw = get(tc, "hidden_size")?;
        let (is, ps) = (get(vc, "image_size")?, get(vc, "patch_size")?);
        if ps == 0 || is % ps != 0 {
            return Err(Error::model(
                path,
                format!("vision_config: image_size {is} is not a whole number of {ps}-pixel patches; the patch grid does not fit the image, so its patch tokens cannot be laid out on the image"),
            ));
        }
        Ok(ClipShape {
            vision: VisionShape {
                image_size: get(vc, "image_size")?,
                patch_size: get(vc, "patch_size")?,
                width: vw,
                layers: get(vc, "num_hidden_layers")?,
                heads: get(vc, "num_attention_heads")?,
                mlp_dim: ffn(vc, vw),
            },
            text: TextShape {
                vocab_size: get(tc, "vocab_size")?,
                context_length: get(tc, "max_position_embeddings")?,
                width: tw,
                layers: get(tc, "num_hidden_layers")?,
                heads: get(tc, "num_attention_heads")?,
                mlp_dim: ffn(tc, tw),
            },
            embed_dim: v.get("projection_dim").and_then(serde_json::Value::as_u64).map(|n| n as usize).unwrap_or(512),
            activation: act,
            eos_token_id: tc.get("eos_token_id").and_then(serde_json::Value::as_u64).map(|n| n as u32),
        })
    }
}

pub const LN_EPS: f64 = 1e-5;
/// open_clip clamps the learned scale at 100.
pub const MAX_LOGIT_SCALE: f32 = 100.0;

/// The trainable tensors, by Hugging Face name, in a fixed order.
pub struct Params {
    pub vars: BTreeMap<String, Var>,
    /// Hand out the weights detached from the autograd graph: a frozen model's forward then
    /// records nothing (a finetuning probe; evaluation).
    pub frozen: bool,
}

impl Params {
    fn get(&self, name: &str) -> Result<Tensor> {
        let v = self.vars.get(name).ok_or_else(|| Error::Internal(format!("no parameter {name}")))?;
        Ok(if self.frozen { v.as_detached_tensor() } else { v.as_tensor().clone() })
    }

    /// Parameters that get weight decay: matrices, not biases, norms, embeddings' position tables,
    /// the class token or the logit scale (as open_clip: `p.ndim < 2`, `bn`, `ln`, `bias`,
    /// `logit_scale` are excluded, and so are position embeddings).
    pub fn decays(name: &str, t: &Tensor) -> bool {
        t.rank() >= 2 && !name.contains("position_embedding") && !name.contains("norm") && !name.contains("layrnorm")
    }

    /// All weights as tensors, for saving.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
}

/// A student CLIP: its shape and its weights.
pub struct Clip {
    pub shape: ClipShape,
    pub params: Params,
    pub device: Device,
    /// [T, T] additive causal mask (0 on and below the diagonal, a large negative above).
    causal: Tensor,
}

fn normal(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand_distr::{Distribution, Normal};
    let d = Normal::new(0.0f32, std).expect("std is finite");
    (0..n).map(|_| d.sample(rng)).collect()
}

impl Clip {
    /// A freshly initialised student, as open_clip initialises its CLIP (normal with std 0.02 for
    /// token embeddings, 0.01 for text positions, width^-0.5 scaled for attention and the
    /// projections, (2·layers)^-0.5 more for the residual outputs), seeded.
    pub fn init(shape: &ClipShape, seed: u64, device: &Device) -> Result<Clip> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_C11F);
        let mut vars = BTreeMap::new();
        let mut add = |name: String, dims: &[usize], values: Vec<f32>| -> Result<()> {
            let t = Tensor::from_vec(values, dims, device).map_err(ce(&name))?;
            vars.insert(name, Var::from_tensor(&t).map_err(ce("var"))?);
            Ok(())
        };
        let v = &shape.vision;
        let t = &shape.text;
        let np = shape.num_patches();
        let vs = (v.width as f32).powf(-0.5);
        add("vision_model.embeddings.class_embedding".into(), &[v.width], normal(&mut rng, v.width, vs))?;
        let pw = 3 * v.patch_size * v.patch_size;
        add("vision_model.embeddings.patch_embedding.weight".into(), &[v.width, 3, v.patch_size, v.patch_size], normal(&mut rng, v.width * pw, (pw as f32).powf(-0.5)))?;
        add("vision_model.embeddings.position_embedding.weight".into(), &[np + 1, v.width], normal(&mut rng, (np + 1) * v.width, vs))?;
        add("text_model.embeddings.token_embedding.weight".into(), &[t.vocab_size, t.width], normal(&mut rng, t.vocab_size * t.width, 0.02))?;
        add("text_model.embeddings.position_embedding.weight".into(), &[t.context_length, t.width], normal(&mut rng, t.context_length * t.width, 0.01))?;
        for (prefix, width, layers, mlp) in
            [("vision_model", v.width, v.layers, v.mlp_dim), ("text_model", t.width, t.layers, t.mlp_dim)]
        {
            let attn_std = (width as f32).powf(-0.5);
            let proj_std = attn_std * ((2 * layers) as f32).powf(-0.5);
            let fc_std = ((2 * width) as f32).powf(-0.5);
            for l in 0..layers {
                let p = format!("{prefix}.encoder.layers.{l}");
                for (n, std) in [("q_proj", attn_std), ("k_proj", attn_std), ("v_proj", attn_std), ("out_proj", proj_std)] {
                    add(format!("{p}.self_attn.{n}.weight"), &[width, width], normal(&mut rng, width * width, std))?;
                    add(format!("{p}.self_attn.{n}.bias"), &[width], vec![0.0; width])?;
                }
                add(format!("{p}.mlp.fc1.weight"), &[mlp, width], normal(&mut rng, mlp * width, fc_std))?;
                add(format!("{p}.mlp.fc1.bias"), &[mlp], vec![0.0; mlp])?;
                add(format!("{p}.mlp.fc2.weight"), &[width, mlp], normal(&mut rng, width * mlp, proj_std))?;
                add(format!("{p}.mlp.fc2.bias"), &[width], vec![0.0; width])?;
                for n in ["layer_norm1", "layer_norm2"] {
                    add(format!("{p}.{n}.weight"), &[width], vec![1.0; width])?;
                    add(format!("{p}.{n}.bias"), &[width], vec![0.0; width])?;
                }
            }
        }
        for (n, w) in [("vision_model.pre_layrnorm", v.width), ("vision_model.post_layernorm", v.width), ("text_model.final_layer_norm", t.width)] {
            add(format!("{n}.weight"), &[w], vec![1.0; w])?;
            add(format!("{n}.bias"), &[w], vec![0.0; w])?;
        }
        add("visual_projection.weight".into(), &[shape.embed_dim, v.width], normal(&mut rng, shape.embed_dim * v.width, vs))?;
        add("text_projection.weight".into(), &[shape.embed_dim, t.width], normal(&mut rng, shape.embed_dim * t.width, (t.width as f32).powf(-0.5)))?;
        add("logit_scale".into(), &[], vec![(1.0f32 / 0.07).ln()])?;
        Clip::from_vars(shape.clone(), Params { vars, frozen: false }, device)
    }

    fn from_vars(shape: ClipShape, params: Params, device: &Device) -> Result<Clip> {
        let n = shape.text.context_length;
        let mask: Vec<f32> = (0..n * n).map(|i| if i % n > i / n { -1e9 } else { 0.0 }).collect();
        let causal = Tensor::from_vec(mask, (n, n), device).map_err(ce("causal mask"))?;
        Ok(Clip { shape, params, device: device.clone(), causal })
    }

    /// The tensor names and shapes this student has, as Hugging Face names them.
    pub fn expected(shape: &ClipShape) -> Result<BTreeMap<String, Vec<usize>>> {
        let c = Clip::init(shape, 0, &Device::Cpu)?;
        Ok(c.params.vars.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect())
    }

    /// Load weights saved by [`Clip::save`] (or any HF CLIP `model.safetensors` of the same
    /// shape). Every tensor must be there with the shape the config gives: a checkpoint of another
    /// shape is refused, naming the first tensors that differ.
    pub fn load(shape: &ClipShape, path: &Path, device: &Device) -> Result<Clip> {
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::model(path, format!("cannot read safetensors: {e}")))?;
        let expected = Clip::expected(shape)?;
        let mut vars = BTreeMap::new();
        let mut problems = Vec::new();
        for (name, dims) in &expected {
            match tensors.get(name) {
                None => problems.push(format!("{name} is missing")),
                Some(t) if t.dims() != dims.as_slice() => problems.push(format!("{name} has shape {:?}, expected {:?}", t.dims(), dims)),
                Some(t) => {
                    let t = t.to_dtype(DType::F32).map_err(ce(name))?;
                    vars.insert(name.clone(), Var::from_tensor(&t).map_err(ce(name))?);
                }
            }
        }
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(4);
            return Err(Error::model(
                path,
                format!("the weights do not fit the configured model shape ({n} tensors differ: {}{})", problems.join("; "), if n > 4 { "; ..." } else { "" }),
            ));
        }
        Clip::from_vars(shape.clone(), Params { vars, frozen: false }, device)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.params.tensors(), path).map_err(|e| Error::model(path, format!("cannot write safetensors: {e}")))
    }

    /// The learned scale, clamped as it is used.
    pub fn logit_scale(&self) -> Result<Tensor> {
        let ls = self.params.get("logit_scale")?;
        ls.exp().map_err(ce("logit scale"))?.clamp(0f32, MAX_LOGIT_SCALE).map_err(ce("logit scale"))
    }

    /// Keep the stored log-scale within [0, ln 100] after an update (open_clip's in-place clamp).
    pub fn clamp_logit_scale(&self) -> Result<()> {
        let v = &self.params.vars["logit_scale"];
        let c = v.as_tensor().clamp(0f32, MAX_LOGIT_SCALE.ln()).map_err(ce("clamp"))?;
        v.set(&c).map_err(ce("clamp"))
    }

    /// Image features: pixels [B, 3, H, W] (normalised) → [B, embed_dim], not normalised.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        self.image_tokens(pixels).and_then(|(x, _)| self.image_pool(&x))
    }

    /// The image tower up to its last layer: tokens [B, 1 + N, width] (class token first) and the
    /// input of the last layer (for dense heads and MaskCLIP-style readouts).
    pub fn image_tokens(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = ce("image tower");
        let v = &self.shape.vision;
        let (b, c, h, w) = pixels.dims4().map_err(ce("pixels"))?;
        let p = v.patch_size;
        if c != 3 || h != v.image_size || w != v.image_size {
            return Err(Error::Internal(format!("pixels are [{b}, {c}, {h}, {w}]; the model takes [B, 3, {0}, {0}]", v.image_size)));
        }
        let (gh, gw) = (h / p, w / p);
        // [B,3,gh,p,gw,p] → [B,gh,gw,3,p,p] → [B·N, 3·p·p]: each row is a patch flattened in the
        // order conv2d's weight [width, 3, p, p] is.
        let patches = pixels
            .reshape((b, 3, gh, p, gw, p))
            .and_then(|t| t.permute((0, 2, 4, 1, 3, 5)))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape((b * gh * gw, 3 * p * p)))
            .map_err(f)?;
        let wpatch = self.params.get("vision_model.embeddings.patch_embedding.weight")?.reshape((v.width, 3 * p * p)).map_err(ce("patch weight"))?;
        let x = patches.matmul(&wpatch.t().map_err(ce("t"))?).map_err(ce("patchify"))?.reshape((b, gh * gw, v.width)).map_err(ce("patchify"))?;
        let cls = self.params.get("vision_model.embeddings.class_embedding")?.reshape((1, 1, v.width)).and_then(|t| t.broadcast_as((b, 1, v.width))).map_err(ce("cls"))?;
        let x = Tensor::cat(&[&cls, &x], 1).map_err(ce("cls"))?;
        let x = x.broadcast_add(&self.params.get("vision_model.embeddings.position_embedding.weight")?).map_err(ce("position"))?;
        let mut x = self.layer_norm(&x, "vision_model.pre_layrnorm")?;
        let mut before_last = x.clone();
        for l in 0..v.layers {
            if l + 1 == v.layers {
                before_last = x.clone();
            }
            x = self.block(&x, &format!("vision_model.encoder.layers.{l}"), v.heads, None)?;
        }
        Ok((x, before_last))
    }

    /// MaskCLIP's dense readout (Zhou et al. 2022, <https://arxiv.org/abs/2112.01071>): the last
    /// layer's value embedding of every patch, through its output projection, the post-layernorm
    /// and the visual projection, skipping query/key mixing; [B, N patches, embed_dim], not
    /// normalised. Comparable with text embeddings, patch by patch.
    pub fn dense_embeddings(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, before_last) = self.image_tokens(pixels)?;
        let l = self.shape.vision.layers - 1;
        let p = format!("vision_model.encoder.layers.{l}");
        let h = self.layer_norm(&before_last, &format!("{p}.layer_norm1"))?;
        let v = self.linear(&h, &format!("{p}.self_attn.v_proj"), true)?;
        let o = self.linear(&v, &format!("{p}.self_attn.out_proj"), true)?;
        let n = o.dim(1).map_err(ce("tokens"))?;
        let patches = o.narrow(1, 1, n - 1).map_err(ce("patches"))?;
        let patches = self.layer_norm(&patches, "vision_model.post_layernorm")?;
        self.linear(&patches, "visual_projection", false)
    }

    /// The image tower's final layer norm (for patch tokens).
    pub fn post_layernorm(&self, x: &Tensor) -> Result<Tensor> {
        self.layer_norm(x, "vision_model.post_layernorm")
    }

    fn image_pool(&self, x: &Tensor) -> Result<Tensor> {
        let cls = x.narrow(1, 0, 1).and_then(|t| t.squeeze(1)).map_err(ce("pool"))?;
        let cls = self.layer_norm(&cls, "vision_model.post_layernorm")?;
        self.linear(&cls, "visual_projection", false)
    }

    /// Text features: token ids [B, T] (T ≤ context length) and the position each row is pooled
    /// at → [B, embed_dim], not normalised.
    pub fn encode_text(&self, ids: &Tensor, pool_at: &[u32]) -> Result<Tensor> {
        let t = &self.shape.text;
        let (b, len) = ids.dims2().map_err(ce("ids"))?;
        if len > t.context_length {
            return Err(Error::Internal(format!("{len} tokens; the text tower takes at most {}", t.context_length)));
        }
        let tok = self.params.get("text_model.embeddings.token_embedding.weight")?;
        let x = tok.index_select(&ids.flatten_all().map_err(ce("ids"))?, 0).and_then(|x| x.reshape((b, len, t.width))).map_err(ce("token embedding"))?;
        let pos = self.params.get("text_model.embeddings.position_embedding.weight")?.narrow(0, 0, len).map_err(ce("positions"))?;
        let mut x = x.broadcast_add(&pos).map_err(ce("positions"))?;
        let mask = self.causal.narrow(0, 0, len).and_then(|m| m.narrow(1, 0, len)).map_err(ce("mask"))?;
        for l in 0..t.layers {
            x = self.block(&x, &format!("text_model.encoder.layers.{l}"), t.heads, Some(&mask))?;
        }
        // Only the pooled rows need the final norm (it is per token).
        let idx: Vec<u32> = pool_at.iter().enumerate().map(|(i, p)| (i * len) as u32 + p).collect();
        let idx = Tensor::from_vec(idx, b, &self.device).map_err(ce("pool index"))?;
        let pooled = x.reshape((b * len, t.width)).and_then(|x| x.index_select(&idx, 0)).map_err(ce("pool"))?;
        let pooled = self.layer_norm(&pooled, "text_model.final_layer_norm")?;
        self.linear(&pooled, "text_projection", false)
    }

    /// `x @ Wᵀ + b` over the last dimension, for any leading shape.
    fn linear(&self, x: &Tensor, name: &str, bias: bool) -> Result<Tensor> {
        let w = self.params.get(&format!("{name}.weight"))?;
        self.linear_w(x, &w, if bias { Some(self.params.get(&format!("{name}.bias"))?) } else { None })
    }

    fn linear_w(&self, x: &Tensor, w: &Tensor, b: Option<Tensor>) -> Result<Tensor> {
        if let (Some(b), true) = (&b, x.device().is_cpu()) {
            return super::ops::linear(x, w, b).map_err(ce("linear"));
        }
        let f = ce("linear");
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("rank ≥ 1");
        let rows = x.elem_count() / d_in;
        let y = x.reshape((rows, d_in)).and_then(|x| x.matmul(&w.t()?)).map_err(f)?;
        let y = match b {
            Some(b) => y.broadcast_add(&b).map_err(ce("bias"))?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = w.dim(0).map_err(ce("w"))?;
        y.reshape(out).map_err(ce("linear"))
    }

    /// Layer norm from primitive ops, so that it has a backward.
    fn layer_norm(&self, x: &Tensor, name: &str) -> Result<Tensor> {
        layer_norm(x, &self.params.get(&format!("{name}.weight"))?, &self.params.get(&format!("{name}.bias"))?)
    }

    /// A pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x)).
    fn block(&self, x: &Tensor, p: &str, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.layer_norm(x, &format!("{p}.layer_norm1"))?;
        let h = self.attention(&h, &format!("{p}.self_attn"), heads, mask)?;
        let x = (x + h).map_err(ce("residual"))?;
        let h = self.layer_norm(&x, &format!("{p}.layer_norm2"))?;
        let h = self.linear(&h, &format!("{p}.mlp.fc1"), true)?;
        let h = activation(&h, self.shape.activation)?;
        let h = self.linear(&h, &format!("{p}.mlp.fc2"), true)?;
        (x + h).map_err(ce("residual"))
    }

    fn attention(&self, x: &Tensor, p: &str, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let f = |what: &'static str| ce(what);
        let (b, t, d) = x.dims3().map_err(f("attention input"))?;
        let q = self.linear(x, &format!("{p}.q_proj"), true)?;
        let k = self.linear(x, &format!("{p}.k_proj"), true)?;
        let v = self.linear(x, &format!("{p}.v_proj"), true)?;
        let out = if x.device().is_cpu() {
            super::ops::attention(&q, &k, &v, heads, mask.is_some()).map_err(f("attention"))?
        } else {
            let hd = d / heads;
            let split = |x: &Tensor| -> Result<Tensor> {
                x.reshape((b, t, heads, hd)).and_then(|x| x.transpose(1, 2)).and_then(|x| x.contiguous()).map_err(f("split heads"))
            };
            let q = (split(&q)? * (hd as f64).powf(-0.5)).map_err(f("scale"))?;
            let (k, v) = (split(&k)?, split(&v)?);
            let mut scores = q.matmul(&k.t().map_err(f("kT"))?).map_err(f("scores"))?;
            if let Some(m) = mask {
                scores = scores.broadcast_add(m).map_err(f("mask"))?;
            }
            let probs = candle_nn::ops::softmax(&scores, D::Minus1).map_err(f("softmax"))?;
            let out = probs.matmul(&v).map_err(f("attend"))?;
            out.transpose(1, 2).and_then(|x| x.reshape((b, t, d))).map_err(f("merge heads"))?
        };
        self.linear(&out, &format!("{p}.out_proj"), true)
    }
}

/// The MLP's activation: the fused op (with its own backward) on CPU for quick_gelu.
fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::QuickGelu if x.device().is_cpu() => super::ops::quick_gelu(x).map_err(ce("quick_gelu")),
        Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702).map_err(ce("quick_gelu"))?).map_err(ce("quick_gelu"))?).map_err(ce("quick_gelu")),
        Activation::Gelu => x.gelu_erf().map_err(ce("gelu")),
    }
}

/// (x − mean) / sqrt(var + ε) · γ + β over the last dimension: the fused op on CPU, the
/// composed ops elsewhere.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        super::ops::layer_norm(x, gamma, beta, LN_EPS).map_err(ce("layer norm"))
    } else {
        layer_norm_composed(x, gamma, beta)
    }
}

/// Layer norm from primitive ops, all with a backward (candle-nn's fused one has none).
pub fn layer_norm_composed(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let f = ce("layer norm");
    let mean = x.mean_keepdim(D::Minus1).map_err(ce("layer norm"))?;
    let xc = x.broadcast_sub(&mean).map_err(ce("layer norm"))?;
    let var = xc.sqr().and_then(|v| v.mean_keepdim(D::Minus1)).map_err(ce("layer norm"))?;
    let inv = (var + LN_EPS).and_then(|v| v.sqrt()).and_then(|v| v.recip()).map_err(ce("layer norm"))?;
    xc.broadcast_mul(&inv).and_then(|y| y.broadcast_mul(gamma)).and_then(|y| y.broadcast_add(beta)).map_err(f)
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr().and_then(|s| s.sum_keepdim(D::Minus1)).and_then(|s| (s + 1e-12)?.sqrt()).map_err(ce("normalize"))?;
    x.broadcast_div(&n).map_err(ce("normalize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn micro() -> ClipShape {
        ClipShape {
            vision: VisionShape { image_size: 16, patch_size: 8, width: 16, layers: 2, heads: 2, mlp_dim: 32 },
            text: TextShape { vocab_size: 50, context_length: 8, width: 16, layers: 2, heads: 2, mlp_dim: 32 },
            embed_dim: 8,
            activation: Activation::QuickGelu,
            eos_token_id: Some(3),
        }
    }

    #[test]
    fn every_trainable_tensor_gets_a_gradient() {
        let dev = Device::Cpu;
        let clip = Clip::init(&micro(), 1, &dev).unwrap();
        let px = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &dev).unwrap();
        let ids = Tensor::from_vec(vec![1u32, 5, 6, 3, 1, 7, 3, 0, 1, 9, 10, 3, 1, 3, 0, 0], (4, 4), &dev).unwrap();
        let img = l2_normalize(&clip.encode_image(&px).unwrap()).unwrap();
        let txt = l2_normalize(&clip.encode_text(&ids, &[3, 2, 3, 1]).unwrap()).unwrap();
        let loss = crate::train::loss::contrastive(&crate::train::loss::student_logits(&img, &txt, &clip.logit_scale().unwrap()).unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &clip.params.vars {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            // Token rows never used are zero, but the table as a whole must move.
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
        }
    }

    #[test]
    fn saved_weights_load_and_another_shape_is_refused() {
        let dev = Device::Cpu;
        let clip = Clip::init(&micro(), 1, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        clip.save(&p).unwrap();
        let back = Clip::load(&micro(), &p, &dev).unwrap();
        let px = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &dev).unwrap();
        let a: Vec<Vec<f32>> = clip.encode_image(&px).unwrap().to_vec2().unwrap();
        let b: Vec<Vec<f32>> = back.encode_image(&px).unwrap().to_vec2().unwrap();
        assert_eq!(a, b);
        let mut other = micro();
        other.vision.width = 32;
        let e = Clip::load(&other, &p, &dev).err().unwrap().to_string();
        assert!(e.contains("do not fit") && e.contains("vision_model.embeddings.class_embedding has shape [16], expected [32]"), "{e}");
    }
}
