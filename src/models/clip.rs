//! A CLIP model from a directory as users export it: one `model.onnx` with both towers
//! (`optimum-cli export onnx --task zero-shot-image-classification`), or separate image and text
//! encoder files (the open_clip / clip-as-service style). Embeddings come out L2-normalised.

use std::path::{Path, PathBuf};

use image::RgbImage;
use ort::session::Session;
use ort::value::{Tensor, TensorElementType as T, TensorRef};

use super::hf::{read_json, ImageProcessor, TextTokenizer};
use super::runtime::{check_io, expect, input_shape, open_session, run_err, SessionOptions};
use crate::error::{Error, Result};

/// File names accepted for the image and text towers, in order of preference.
pub const IMAGE_TOWER_FILES: [&str; 3] = ["image_encoder.onnx", "visual.onnx", "vision_model.onnx"];
pub const TEXT_TOWER_FILES: [&str; 3] = ["text_encoder.onnx", "textual.onnx", "text_model.onnx"];

enum Layout {
    /// One graph, both towers; each call feeds a one-row dummy for the side it does not need.
    Joint { session: Session, has_mask: bool },
    Towers { image: Session, image_out: String, text: Session, text_out: String, has_mask: bool },
}

pub struct Clip {
    pub dir: PathBuf,
    layout: Layout,
    pub processor: ImageProcessor,
    pub tokenizer: TextTokenizer,
    /// Embedding width.
    pub dim: usize,
    /// (height, width) of `pixel_values`.
    pub image_hw: (u32, u32),
}

fn first_existing(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

fn output_name(path: &Path, s: &Session, preferred: &str) -> Result<String> {
    if s.outputs().iter().any(|o| o.name() == preferred) {
        return Ok(preferred.to_string());
    }
    match s.outputs() {
        [only] => Ok(only.name().to_string()),
        outs => Err(Error::model(
            path,
            format!(
                "output `{preferred}` is missing and there is not exactly one output to use instead; outputs: {}",
                outs.iter().map(|o| format!("`{}`", o.name())).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn text_max_len(dir: &Path) -> Result<usize> {
    let cfg = read_json(&dir.join("config.json"))?;
    let n = ["text_config", ""]
        .iter()
        .filter_map(|k| if k.is_empty() { Some(&cfg) } else { cfg.get(*k) })
        .find_map(|c| c.get("max_position_embeddings").or_else(|| c.get("context_length")).and_then(|v| v.as_u64()));
    Ok(n.unwrap_or(77) as usize)
}

fn l2_normalise(v: &mut [f32], dim: usize) {
    for row in v.chunks_mut(dim) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= n);
    }
}

impl Clip {
    /// Load and check a CLIP directory; runs one tiny batch so that a model which loads but
    /// cannot run is refused here, not on the first shard.
    pub fn load(dir: &Path, opts: &SessionOptions) -> Result<Clip> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "not a directory"));
        }
        let processor = ImageProcessor::from_file(&super::hf::required(dir, "preprocessor_config.json")?)?;
        let tokenizer = TextTokenizer::load(dir, text_max_len(dir)?)?;
        let joint = dir.join("model.onnx");
        let (layout, pixel_shape, pixel_path) = if joint.is_file() {
            let session = open_session(&joint, opts)?;
            check_io(
                &joint,
                &session,
                &[expect("input_ids", T::Int64, 2), expect("pixel_values", T::Float32, 4)],
                &[expect("image_embeds", T::Float32, 2), expect("text_embeds", T::Float32, 2)],
            )?;
            let has_mask = session.inputs().iter().any(|i| i.name() == "attention_mask");
            let shape = input_shape(&session, "pixel_values");
            (Layout::Joint { session, has_mask }, shape, joint)
        } else {
            let (Some(ip), Some(tp)) = (first_existing(dir, &IMAGE_TOWER_FILES), first_existing(dir, &TEXT_TOWER_FILES)) else {
                return Err(Error::model(
                    dir,
                    format!(
                        "no CLIP graph: expected model.onnx, or an image tower ({}) and a text tower ({})",
                        IMAGE_TOWER_FILES.join(" / "),
                        TEXT_TOWER_FILES.join(" / ")
                    ),
                ));
            };
            let image = open_session(&ip, opts)?;
            check_io(&ip, &image, &[expect("pixel_values", T::Float32, 4)], &[])?;
            let text = open_session(&tp, opts)?;
            check_io(&tp, &text, &[expect("input_ids", T::Int64, 2)], &[])?;
            let image_out = output_name(&ip, &image, "image_embeds")?;
            let text_out = output_name(&tp, &text, "text_embeds")?;
            let has_mask = text.inputs().iter().any(|i| i.name() == "attention_mask");
            let shape = input_shape(&image, "pixel_values");
            (Layout::Towers { image, image_out, text, text_out, has_mask }, shape, ip)
        };
        // The processor's output must fit the graph's pixel_values where the graph fixes it.
        let (h, w) = processor.check_fits(&pixel_path, pixel_shape)?;
        let mut clip = Clip { dir: dir.to_path_buf(), layout, processor, tokenizer, dim: 0, image_hw: (h, w) };
        let probe = clip.embed_texts(&["a"]).map_err(|e| Error::model(dir, format!("a one-text test batch failed: {e}")))?;
        clip.dim = probe.len();
        let img = RgbImage::new(w, h);
        let emb = clip.embed_images(&[&img]).map_err(|e| Error::model(dir, format!("a one-image test batch failed: {e}")))?;
        if emb.len() != clip.dim {
            return Err(Error::model(dir, format!("image embeddings have {} values and text embeddings {}; they must match", emb.len(), clip.dim)));
        }
        Ok(clip)
    }

    /// `pixel_values` for a batch, as [n, 3, h, w] float32.
    pub fn pixel_values(&self, images: &[&RgbImage]) -> std::result::Result<Vec<f32>, String> {
        self.processor.batch(images, self.image_hw)
    }

    /// L2-normalised image embeddings, [n * dim].
    pub fn embed_images(&mut self, images: &[&RgbImage]) -> std::result::Result<Vec<f32>, String> {
        let pixels = self.pixel_values(images)?;
        self.embed_pixels(&pixels, images.len())
    }

    /// L2-normalised image embeddings from ready `pixel_values` ([n, 3, h, w]), borrowed by
    /// ONNX Runtime as they are (no copy).
    pub fn embed_pixels(&mut self, pixels: &[f32], n: usize) -> std::result::Result<Vec<f32>, String> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let (h, w) = self.image_hw;
        let px = TensorRef::from_array_view(([n, 3, h as usize, w as usize], pixels)).map_err(run_err)?;
        let mut out = match &mut self.layout {
            Layout::Joint { session, has_mask } => {
                let (ids, mask, t) = self.tokenizer.batch(&[""])?;
                let mut inputs = ort::inputs! {
                    "input_ids" => Tensor::from_array(([1, t], ids)).map_err(run_err)?,
                    "pixel_values" => px,
                };
                if *has_mask {
                    inputs.push(("attention_mask".into(), Tensor::from_array(([1, t], mask)).map_err(run_err)?.into()));
                }
                let outputs = session.run(inputs).map_err(run_err)?;
                outputs["image_embeds"].try_extract_tensor::<f32>().map_err(run_err)?.1.to_vec()
            }
            Layout::Towers { image, image_out, .. } => {
                let outputs = image.run(ort::inputs! { "pixel_values" => px }).map_err(run_err)?;
                outputs[image_out.as_str()].try_extract_tensor::<f32>().map_err(run_err)?.1.to_vec()
            }
        };
        let dim = out.len() / n;
        l2_normalise(&mut out, dim);
        Ok(out)
    }

    /// L2-normalised text embeddings, [n * dim].
    pub fn embed_texts(&mut self, texts: &[&str]) -> std::result::Result<Vec<f32>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let n = texts.len();
        let (ids, mask, t) = self.tokenizer.batch(texts)?;
        let ids = Tensor::from_array(([n, t], ids)).map_err(run_err)?;
        let mask = Tensor::from_array(([n, t], mask)).map_err(run_err)?;
        let mut out = match &mut self.layout {
            Layout::Joint { session, has_mask } => {
                let (h, w) = self.image_hw;
                let px = Tensor::from_array(([1, 3, h as usize, w as usize], vec![0f32; 3 * (h * w) as usize])).map_err(run_err)?;
                let mut inputs = ort::inputs! { "input_ids" => ids, "pixel_values" => px };
                if *has_mask {
                    inputs.push(("attention_mask".into(), mask.into()));
                }
                let outputs = session.run(inputs).map_err(run_err)?;
                outputs["text_embeds"].try_extract_tensor::<f32>().map_err(run_err)?.1.to_vec()
            }
            Layout::Towers { text, text_out, has_mask, .. } => {
                let mut inputs = ort::inputs! { "input_ids" => ids };
                if *has_mask {
                    inputs.push(("attention_mask".into(), mask.into()));
                }
                let outputs = text.run(inputs).map_err(run_err)?;
                outputs[text_out.as_str()].try_extract_tensor::<f32>().map_err(run_err)?.1.to_vec()
            }
        };
        let dim = out.len() / n;
        l2_normalise(&mut out, dim);
        Ok(out)
    }
}
