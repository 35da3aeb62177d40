//! The losses: CLIP's symmetric InfoNCE and MobileCLIP's distillation from stored teacher
//! embeddings (apple/ml-mobileclip `training/open_clip_v2.patch`: `DistillClipLoss`,
//! `DRClipLoss`), written from ops that have a backward in candle (`candle_nn::ops::log_softmax`,
//! not the fused softmax).

use candle_core::{DType, Tensor, D};

use super::model::ce;
use crate::error::Result;

/// Mean cross-entropy of each row of `logits` [B, B] against its diagonal entry.
fn diagonal_ce(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0).map_err(ce("logits"))?;
    let lsm = candle_nn::ops::log_softmax(logits, D::Minus1).map_err(ce("log_softmax"))?;
    let eye = Tensor::eye(n, DType::F32, logits.device()).map_err(ce("eye"))?;
    (lsm * eye).and_then(|t| t.sum_all()).and_then(|t| t.affine(-1.0 / n as f64, 0.0)).map_err(ce("cross-entropy"))
}

/// CLIP's loss on the student's logits ([`student_logits`]: rows images, columns texts):
/// cross-entropy against the matching pair, averaged over image→text and text→image.
pub fn contrastive(logits: &Tensor) -> Result<Tensor> {
    let a = diagonal_ce(logits)?;
    let b = diagonal_ce(&logits.t().map_err(ce("t"))?)?;
    ((a + b).map_err(ce("sum"))? * 0.5).map_err(ce("mean"))
}

/// `scale · img · txtᵀ`, [B, B]; `img`, `txt`: [B, E], L2-normalised; `scale`: a scalar tensor.
pub fn student_logits(img: &Tensor, txt: &Tensor, scale: &Tensor) -> Result<Tensor> {
    img.matmul(&txt.t().map_err(ce("t"))?).and_then(|l| l.broadcast_mul(scale)).map_err(ce("logits"))
}

/// The teachers' targets for one batch: per teacher (its slice of the stored embeddings),
/// `scale_t · img_t · txt_tᵀ`, softmax over each row (image→text) and over each column
/// (text→image), the probabilities averaged over teachers (ml-mobileclip's
/// `--distill-average-after-softmax`). Returns ([B, B] image→text, [B, B] text→image, rows = texts).
///
/// `img`, `txt`: [B, D] with each teacher's slice L2-normalised; `slices`: (offset, width) per
/// teacher; `scales`: one per teacher.
pub fn teacher_targets(img: &Tensor, txt: &Tensor, slices: &[(usize, usize)], scales: &[f32]) -> Result<(Tensor, Tensor)> {
    let mut i2t: Option<Tensor> = None;
    let mut t2i: Option<Tensor> = None;
    for (&(off, w), &s) in slices.iter().zip(scales) {
        let a = img.narrow(1, off, w).map_err(ce("teacher slice"))?;
        let b = txt.narrow(1, off, w).map_err(ce("teacher slice"))?;
        let logits = a.matmul(&b.t().map_err(ce("t"))?).and_then(|l| l.affine(s as f64, 0.0)).map_err(ce("teacher logits"))?;
        let p = candle_nn::ops::softmax(&logits, D::Minus1).map_err(ce("softmax"))?;
        let q = candle_nn::ops::softmax(&logits.t().map_err(ce("t"))?.contiguous().map_err(ce("c"))?, D::Minus1).map_err(ce("softmax"))?;
        i2t = Some(match i2t {
            None => p,
            Some(acc) => (acc + p).map_err(ce("sum"))?,
        });
        t2i = Some(match t2i {
            None => q,
            Some(acc) => (acc + q).map_err(ce("sum"))?,
        });
    }
    let n = slices.len().max(1) as f64;
    let avg = |t: Option<Tensor>| t.expect("at least one teacher").affine(1.0 / n, 0.0).map_err(ce("average"));
    Ok((avg(i2t)?, avg(t2i)?))
}

/// Distillation: `-(p_teacher · log_softmax(student logits)).sum(1).mean()` for image→text and
/// text→image, averaged. `logits`: the student's [B, B] (rows images); `targets`: from
/// [`teacher_targets`].
pub fn distillation(logits: &Tensor, targets: &(Tensor, Tensor)) -> Result<Tensor> {
    let n = logits.dim(0).map_err(ce("logits"))? as f64;
    let one = |l: &Tensor, p: &Tensor| -> Result<Tensor> {
        let lsm = candle_nn::ops::log_softmax(l, D::Minus1).map_err(ce("log_softmax"))?;
        (lsm * p).and_then(|t| t.sum_all()).and_then(|t| t.affine(-1.0 / n, 0.0)).map_err(ce("distillation"))
    };
    let a = one(logits, &targets.0)?;
    let b = one(&logits.t().map_err(ce("t"))?, &targets.1)?;
    ((a + b).map_err(ce("sum"))? * 0.5).map_err(ce("mean"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // Reference values from PyTorch 2.15 (CPU, float64), produced by:
    //
    //   import torch, torch.nn.functional as F; torch.set_default_dtype(torch.float64)
    //   img = torch.tensor(IMG); txt = torch.tensor(TXT)          # the arrays below
    //   ti = torch.tensor(TEACHER_IMG); tt = torch.tensor(TEACHER_TXT)
    //   img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    //   scale = 3.0
    //   logits = scale * img @ txt.T; labels = torch.arange(3)
    //   contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    //   # ml-mobileclip DistillClipLoss, average after softmax, teachers = slices [0:2], [2:4]
    //   p_i2t = sum(F.softmax(s * ti[:, a:b] @ tt[:, a:b].T, 1) for s, (a, b) in [(70, (0, 2)), (60, (2, 4))]) / 2
    //   p_t2i = sum(F.softmax(s * tt[:, a:b] @ ti[:, a:b].T, 1) for s, (a, b) in [(70, (0, 2)), (60, (2, 4))]) / 2
    //   distill = (-(p_i2t * F.log_softmax(logits, 1)).sum(1).mean() - (p_t2i * F.log_softmax(logits.T, 1)).sum(1).mean()) / 2
    //
    // (see tools/references/losses.py, which prints these numbers).
    const IMG: [[f32; 4]; 3] = [[0.3, -1.2, 0.5, 0.8], [1.1, 0.4, -0.7, 0.2], [-0.5, 0.9, 1.3, -0.4]];
    const TXT: [[f32; 4]; 3] = [[0.2, -1.0, 0.9, 0.6], [0.8, 0.1, -0.2, 0.9], [-1.3, 0.7, 0.4, -0.1]];
    // Teacher embeddings: two teachers of width 2, each slice L2-normalised.
    const TI: [[f32; 4]; 3] = [[0.6, 0.8, 1.0, 0.0], [0.0, 1.0, 0.6, 0.8], [-0.8, 0.6, 0.0, -1.0]];
    const TT: [[f32; 4]; 3] = [[0.8, 0.6, 0.8, 0.6], [0.6, 0.8, 0.0, 1.0], [-1.0, 0.0, 0.6, -0.8]];

    fn t(rows: &[[f32; 4]; 3]) -> Tensor {
        Tensor::from_vec(rows.concat(), (3, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn losses_match_pytorch() {
        let img = crate::train::model::l2_normalize(&t(&IMG)).unwrap();
        let txt = crate::train::model::l2_normalize(&t(&TXT)).unwrap();
        let scale = Tensor::new(3f32, &Device::Cpu).unwrap();
        let logits = student_logits(&img, &txt, &scale).unwrap();
        let c: f32 = contrastive(&logits).unwrap().to_scalar().unwrap();
        let targets = teacher_targets(&t(&TI), &t(&TT), &[(0, 2), (2, 2)], &[70.0, 60.0]).unwrap();
        let d: f32 = distillation(&logits, &targets).unwrap().to_scalar().unwrap();
        assert!((c - REF_CONTRASTIVE).abs() < 1e-4, "contrastive {c} vs {REF_CONTRASTIVE}");
        assert!((d - REF_DISTILL).abs() < 1e-4, "distillation {d} vs {REF_DISTILL}");
    }

    const REF_CONTRASTIVE: f32 = 0.135265;
    const REF_DISTILL: f32 = 0.942133;
}
