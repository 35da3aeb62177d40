//! Start a student from a Hugging Face CLIP's weights (`model.init_from`), with TinyCLIP's manual
//! weight inheritance (Wu et al. 2023, <https://arxiv.org/abs/2309.12314>; microsoft/Cream
//! `TinyCLIP/src/open_clip/weight_inherit.py`): student layer i takes teacher layer
//! ⌊i · teacher_layers / student_layers⌋ (evenly spaced), and every tensor keeps the leading slice
//! of each dimension; attention projections are sliced per head (the first heads, the first dims
//! of each head). Where the student is wider than the teacher in a dimension, the teacher's values
//! fill the leading part and the rest keeps its initialisation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::model::{ce, Clip, ClipShape};
use crate::error::{Error, Result};

/// What was inherited, for the run's log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inherited {
    /// Tensors copied whole.
    pub whole: usize,
    /// Tensors of which the student holds a slice of the teacher's (student narrower).
    pub sliced: usize,
    /// Tensors that are partly the teacher's, partly initialised (student wider somewhere).
    pub partial: Vec<String>,
    /// Teacher layer each student layer took: (tower, student layer, teacher layer).
    pub layers: Vec<(String, usize, usize)>,
}

/// The weights file and config of an `init_from` value: a directory holding model.safetensors
/// and config.json, or the safetensors file with config.json beside it.
pub fn locate(spec: &str) -> Result<(PathBuf, PathBuf)> {
    let p = Path::new(spec);
    let (weights, dir) = if p.is_dir() { (p.join("model.safetensors"), p.to_path_buf()) } else { (p.to_path_buf(), p.parent().map(Path::to_path_buf).unwrap_or_default()) };
    if !weights.is_file() {
        return Err(Error::model(&weights, "file not found; expected a Hugging Face CLIP model.safetensors (or its directory)"));
    }
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(Error::model(&config, "file not found; a config.json (Hugging Face CLIPConfig) must sit beside the weights"));
    }
    Ok((weights, config))
}

/// The teacher's shape, read from its config.json.
pub fn teacher_shape(spec: &str) -> Result<ClipShape> {
    let (_, config) = locate(spec)?;
    ClipShape::from_hf_config(&config)
}

/// Whether a student can inherit from a teacher: same patch size and patch grid (position
/// embeddings must line up).
pub fn compatible(s: &ClipShape, t: &ClipShape) -> std::result::Result<(), String> {
    if s.vision.patch_size != t.vision.patch_size {
        return Err(format!("patch size {} in the teacher, {} in the student; expected the same", t.vision.patch_size, s.vision.patch_size));
    }
    if s.vision.image_size != t.vision.image_size {
        return Err(format!(
            "the teacher sees {0}x{0} images and the student {1}x{1}: their position embeddings would not line up; expected the same image_size",
            t.vision.image_size, s.vision.image_size
        ));
    }
    Ok(())
}

/// Copy the overlapping leading box of `src` (dims `sd`) into `dst` (dims `dd`), both row-major.
fn copy_box(src: &[f32], sd: &[usize], dst: &mut [f32], dd: &[usize]) {
    let r = sd.len();
    let common: Vec<usize> = sd.iter().zip(dd).map(|(a, b)| *a.min(b)).collect();
    if common.contains(&0) {
        return;
    }
    let stride = |d: &[usize]| -> Vec<usize> {
        let mut s = vec![1; d.len()];
        for i in (0..d.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * d[i + 1];
        }
        s
    };
    let (ss, ds) = (stride(sd), stride(dd));
    let mut idx = vec![0usize; r];
    loop {
        // The innermost dimension is contiguous in both: copy it as a run.
        let (so, dof) = (0..r - 1).fold((0, 0), |(a, b), k| (a + idx[k] * ss[k], b + idx[k] * ds[k]));
        let n = common[r - 1];
        dst[dof..dof + n].copy_from_slice(&src[so..so + n]);
        let mut k = r - 1;
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < common[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}

/// Per-head views of attention tensors: [H·hd, W] → [H, hd, W], [W, H·hd] → [W, H, hd], [H·hd] → [H, hd].
fn head_view(name: &str, dims: &[usize], heads: usize) -> Vec<usize> {
    let attn_in = ["q_proj", "k_proj", "v_proj"].iter().any(|p| name.contains(p));
    if attn_in && dims.len() == 2 {
        return vec![heads, dims[0] / heads, dims[1]];
    }
    if attn_in && dims.len() == 1 {
        return vec![heads, dims[0] / heads];
    }
    if name.contains("out_proj.weight") {
        return vec![dims[0], heads, dims[1] / heads];
    }
    dims.to_vec()
}

/// Overwrite a freshly initialised student with the teacher's weights, as described above.
pub fn inherit(student: &Clip, spec: &str) -> Result<Inherited> {
    let (weights, _) = locate(spec)?;
    let teacher = teacher_shape(spec)?;
    let t: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights, &Device::Cpu).map_err(|e| Error::model(&weights, format!("cannot read safetensors: {e}")))?;
    let s = &student.shape;
    let mut out = Inherited::default();
    let towers = [
        ("vision_model", s.vision.layers, teacher.vision.layers, s.vision.heads, teacher.vision.heads),
        ("text_model", s.text.layers, teacher.text.layers, s.text.heads, teacher.text.heads),
    ];
    for (tower, sl, tl, _, _) in towers {
        for i in 0..sl {
            out.layers.push((tower.to_string(), i, i * tl / sl.max(1)));
        }
    }
    compatible(s, &teacher).map_err(|m| Error::model(&weights, m))?;
    for (name, var) in &student.params.vars {
        // Which teacher tensor this one comes from.
        let mut tname = name.clone();
        let mut heads = None;
        for (tower, sl, tl, sh, th) in towers {
            let prefix = format!("{tower}.encoder.layers.");
            if let Some(rest) = name.strip_prefix(&prefix) {
                let (layer, tail) = rest.split_once('.').expect("layer name");
                let i: usize = layer.parse().expect("layer index");
                tname = format!("{prefix}{}.{tail}", i * tl / sl.max(1));
                heads = Some((sh, th));
            }
        }
        let src = t.get(&tname).ok_or_else(|| Error::model(&weights, format!("{tname} is missing; expected Hugging Face CLIP weight names")))?;
        let src = src.to_dtype(DType::F32).map_err(ce(&tname))?;
        let sd = src.dims().to_vec();
        let dd = var.dims().to_vec();
        if sd.len() != dd.len() {
            return Err(Error::model(&weights, format!("{tname} has rank {}, the student's {name} rank {}", sd.len(), dd.len())));
        }
        let (sv, dv) = match heads {
            Some((sh, th)) => (head_view(name, &sd, th), head_view(name, &dd, sh)),
            None => (sd.clone(), dd.clone()),
        };
        let srcv: Vec<f32> = src.flatten_all().and_then(|x| x.to_vec1()).map_err(ce(&tname))?;
        let mut dst: Vec<f32> = var.as_tensor().flatten_all().and_then(|x| x.to_vec1()).map_err(ce(name))?;
        if sv.is_empty() {
            dst = srcv;
        } else {
            copy_box(&srcv, &sv, &mut dst, &dv);
        }
        if sv == dv {
            out.whole += 1;
        } else if dv.iter().zip(&sv).all(|(d, s)| d <= s) {
            out.sliced += 1;
        } else {
            out.partial.push(name.clone());
        }
        let new = Tensor::from_vec(dst, dd.as_slice(), var.device()).map_err(ce(name))?;
        var.set(&new).map_err(ce(name))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_copy_leading_slices() {
        // 2x3 into 3x2: the overlapping 2x2.
        let src = [1., 2., 3., 4., 5., 6.];
        let mut dst = [0f32; 6];
        copy_box(&src, &[2, 3], &mut dst, &[3, 2]);
        assert_eq!(dst, [1., 2., 4., 5., 0., 0.]);
        // Per head: 2 heads of 2 dims, width 1 → 1 head of 1 dim keeps row 0 only.
        let v = head_view("x.self_attn.q_proj.weight", &[4, 1], 2);
        assert_eq!(v, [2, 2, 1]);
    }
}
