//! The files beside the ONNX graphs in a Hugging Face / optimum export: `config.json`,
//! `preprocessor_config.json`, `tokenizer.json`, `generation_config.json`. Sizes, crops,
//! normalisation and special tokens come from these, never from constants in recap.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde_json::Value;

use crate::config::model::ResizeFilter;
use crate::error::{Error, Result};
use crate::imaging::resize_rgb;

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::model(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("not valid JSON: {e}")))
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// `{"height": h, "width": w}`, `{"shortest_edge": s}` or a bare integer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeSpec {
    Exact { height: u32, width: u32 },
    ShortestEdge(u32),
}

fn size_spec(v: &Value, default_square: bool) -> Option<SizeSpec> {
    if let Some(n) = as_u32(v) {
        return Some(if default_square { SizeSpec::Exact { height: n, width: n } } else { SizeSpec::ShortestEdge(n) });
    }
    if let (Some(h), Some(w)) = (v.get("height").and_then(as_u32), v.get("width").and_then(as_u32)) {
        return Some(SizeSpec::Exact { height: h, width: w });
    }
    v.get("shortest_edge").and_then(as_u32).map(SizeSpec::ShortestEdge)
}

/// A Hugging Face image processor (`ViTImageProcessor`, `CLIPImageProcessor` and their kin),
/// replayed: resize, center crop, rescale, normalise, to CHW float32.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub resize: Option<SizeSpec>,
    pub filter: ResizeFilter,
    /// (height, width) of the center crop.
    pub crop: Option<(u32, u32)>,
    pub rescale: Option<f32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

fn triple(v: Option<&Value>, default: [f32; 3], path: &Path, key: &str) -> Result<[f32; 3]> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(0.0) as f32;
            Ok([x; 3])
        }
        Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
            Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32))
        }
        Some(other) => Err(Error::model(path, format!("`{key}` is {other}; expected a number or 3 numbers"))),
    }
}

impl ImageProcessor {
    pub fn from_file(path: &Path) -> Result<ImageProcessor> {
        let v = read_json(path)?;
        let kind = v.get("image_processor_type").and_then(Value::as_str).unwrap_or("");
        // CLIP-style processors default to a shortest-edge resize, a center crop and OpenAI's
        // mean/std; ViT-style ones to an exact size and 0.5/0.5.
        let clip_like = kind.starts_with("CLIP") || (kind.is_empty() && v.get("crop_size").is_some());
        let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let resize = if flag("do_resize", true) {
            let spec = v.get("size").and_then(|s| size_spec(s, !clip_like));
            Some(spec.ok_or_else(|| Error::model(path, "`size` is missing or not {height,width}, {shortest_edge} or an integer"))?)
        } else {
            None
        };
        // PIL resample codes, as Hugging Face stores them.
        let filter = match v.get("resample").and_then(Value::as_u64).unwrap_or(if clip_like { 3 } else { 2 }) {
            0 => ResizeFilter::Nearest,
            1 => ResizeFilter::Lanczos3,
            2 => ResizeFilter::Bilinear,
            3 => ResizeFilter::CatmullRom,
            4 => ResizeFilter::Box,
            5 => ResizeFilter::Hamming,
            n => return Err(Error::model(path, format!("`resample` {n} is not a PIL filter code (0-5)"))),
        };
        let crop = if flag("do_center_crop", clip_like) {
            match v.get("crop_size").and_then(|s| size_spec(s, true)) {
                Some(SizeSpec::Exact { height, width }) => Some((height, width)),
                _ => return Err(Error::model(path, "`do_center_crop` is set but `crop_size` is missing or not {height,width}")),
            }
        } else {
            None
        };
        let rescale = flag("do_rescale", true).then(|| v.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0) as f32);
        let (dmean, dstd) = if clip_like { (OPENAI_MEAN, OPENAI_STD) } else { ([0.5; 3], [0.5; 3]) };
        let (mean, std) = if flag("do_normalize", true) {
            (triple(v.get("image_mean"), dmean, path, "image_mean")?, triple(v.get("image_std"), dstd, path, "image_std")?)
        } else {
            ([0.0; 3], [1.0; 3])
        };
        if std.contains(&0.0) {
            return Err(Error::model(path, "`image_std` has a zero"));
        }
        Ok(ImageProcessor { resize, filter, crop, rescale, mean, std })
    }

    /// The (height, width) of the tensors this processor makes.
    pub fn output_size(&self, w: u32, h: u32) -> (u32, u32) {
        if let Some(c) = self.crop {
            return c;
        }
        let (rw, rh) = self.resized(w, h);
        (rh, rw)
    }

    fn resized(&self, w: u32, h: u32) -> (u32, u32) {
        match self.resize {
            None => (w, h),
            Some(SizeSpec::Exact { height, width }) => (width, height),
            Some(SizeSpec::ShortestEdge(s)) => {
                // As transformers' get_resize_output_image_size: the long side is truncated.
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as u64 * long as u64 / short.max(1) as u64) as u32;
                if w <= h {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    /// `pixel_values` for a batch, [n, 3, h, w] float32, every image made (h, w) = `hw`.
    pub fn batch(&self, images: &[&RgbImage], (h, w): (u32, u32)) -> std::result::Result<Vec<f32>, String> {
        let mut out = Vec::with_capacity(images.len() * 3 * (h * w) as usize);
        for img in images {
            self.process_into(img, &mut out)?;
        }
        Ok(out)
    }

    /// Refuse a graph whose static `pixel_values` shape is not what this processor makes.
    pub fn check_fits(&self, graph: &Path, shape: Option<Vec<i64>>) -> Result<(u32, u32)> {
        let (h, w) = self.output_size(224, 224);
        if let Some(s) = shape {
            let fits = |i: usize, want: u32| s.get(i).is_none_or(|d| *d < 0 || *d == want as i64);
            if !(fits(1, 3) && fits(2, h) && fits(3, w)) {
                return Err(Error::model(graph, format!("input `pixel_values` has shape {s:?} but preprocessor_config.json makes [N, 3, {h}, {w}]")));
            }
        }
        Ok((h, w))
    }

    /// Append one image as CHW float32 to `out`.
    pub fn process_into(&self, img: &RgbImage, out: &mut Vec<f32>) -> std::result::Result<(), String> {
        let (w, h) = img.dimensions();
        let (rw, rh) = self.resized(w, h);
        let resized;
        let img = if (rw, rh) != (w, h) {
            resized = resize_rgb(img, rw, rh, None, self.filter)?;
            &resized
        } else {
            img
        };
        let (ox, oy, ow, oh) = match self.crop {
            Some((ch, cw)) if ch <= rh && cw <= rw => ((rw - cw) / 2, (rh - ch) / 2, cw, ch),
            Some((ch, cw)) => return Err(format!("image of {rw}x{rh} is smaller than the {cw}x{ch} crop")),
            None => (0, 0, rw, rh),
        };
        let scale = self.rescale.unwrap_or(1.0);
        let raw = img.as_raw();
        for c in 0..3 {
            let (m, s) = (self.mean[c], self.std[c]);
            for y in oy..oy + oh {
                let row = &raw[(y * rw) as usize * 3..((y + 1) * rw) as usize * 3];
                out.extend((ox..ox + ow).map(|x| (row[x as usize * 3 + c] as f32 * scale - m) / s));
            }
        }
        Ok(())
    }
}

/// A `tokenizer.json` with the padding and length rules a text encoder needs.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub pad_id: i64,
    pub max_len: usize,
}

/// Find the id of a special token named in `tokenizer_config.json` / `special_tokens_map.json`.
fn special_id(dir: &Path, tok: &tokenizers::Tokenizer, key: &str) -> Option<u32> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(v) = read_json(&dir.join(file)) else { continue };
        let name = match v.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(id) = name.and_then(|n| tok.token_to_id(&n)) {
            return Some(id);
        }
    }
    None
}

impl TextTokenizer {
    pub fn load(dir: &Path, max_len: usize) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::model(&path, "file not found (a tokenizer.json is required beside the model)"));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::model(&path, format!("cannot load: {e}")))?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| special_id(dir, &inner, "pad_token"))
            .or_else(|| special_id(dir, &inner, "eos_token"))
            .unwrap_or(0) as i64;
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| Error::model(&path, format!("truncation: {e}")))?;
        Ok(TextTokenizer { inner, pad_id, max_len })
    }

    /// Token ids and attention mask, padded to the longest text: ([n, t] ids, [n, t] mask, t).
    pub fn batch(&self, texts: &[&str]) -> std::result::Result<(Vec<i64>, Vec<i64>, usize), String> {
        let enc: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.inner.encode(*t, true).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string()))
            .collect::<std::result::Result<_, _>>()?;
        let t = enc.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = Vec::with_capacity(texts.len() * t);
        let mut mask = Vec::with_capacity(texts.len() * t);
        for e in &enc {
            ids.extend(e.iter().map(|&i| i as i64));
            mask.extend(std::iter::repeat_n(1i64, e.len()));
            ids.extend(std::iter::repeat_n(self.pad_id, t - e.len()));
            mask.extend(std::iter::repeat_n(0i64, t - e.len()));
        }
        Ok((ids, mask, t))
    }

    pub fn decode(&self, ids: &[u32]) -> std::result::Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| e.to_string())
    }
}

/// Special token ids and lengths for generation (`generation_config.json`, then `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationDefaults {
    pub decoder_start_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    pub max_length: usize,
}

impl GenerationDefaults {
    pub fn load(dir: &Path) -> Result<GenerationDefaults> {
        let gen_path = dir.join("generation_config.json");
        let cfg_path = dir.join("config.json");
        let gen = if gen_path.is_file() { read_json(&gen_path)? } else { Value::Null };
        let cfg = read_json(&cfg_path)?;
        let dec = cfg.get("decoder").cloned().unwrap_or(Value::Null);
        let find = |key: &str| -> Option<&Value> {
            [&gen, &cfg, &dec].into_iter().find_map(|v| v.get(key).filter(|x| !x.is_null()))
        };
        let id = |key: &str| find(key).and_then(as_u32);
        let start = id("decoder_start_token_id")
            .or_else(|| id("bos_token_id"))
            .ok_or_else(|| Error::model(&gen_path, "no decoder_start_token_id or bos_token_id"))?;
        let eos = match find("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(as_u32).collect(),
            Some(v) => as_u32(v).into_iter().collect(),
            None => vec![],
        };
        if eos.is_empty() {
            return Err(Error::model(&gen_path, "no eos_token_id"));
        }
        let pad = id("pad_token_id").unwrap_or(eos[0]);
        let max_length = find("max_length").and_then(Value::as_u64).unwrap_or(20) as usize;
        Ok(GenerationDefaults { decoder_start_token_id: start, eos_token_ids: eos, pad_token_id: pad, max_length })
    }
}

/// A file that must exist in a model directory.
pub fn required(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::model(dir, format!("{name} is missing")))
    }
}
