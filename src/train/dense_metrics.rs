//! Dense evaluation measures, as the segmentation and depth literature reports them:
//! mIoU and pixel accuracy (ADE20K's protocol: a confusion matrix accumulated over the whole
//! evaluation set, IoU per class = TP / (TP + FP + FN), mean over classes that occur), and depth
//! RMSE, AbsRel and δ < 1.25 (NYUv2's, Eigen et al. 2014), over pixels with valid ground truth.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Accumulates a confusion matrix over images.
#[derive(Debug, Clone)]
pub struct Confusion {
    pub classes: usize,
    /// [truth][prediction] pixel counts.
    pub counts: Vec<u64>,
    /// Label value ignored (ADE20K's 255 / "unlabelled"), if any.
    pub ignore: Option<u32>,
}

/// Segmentation scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegScores {
    pub miou: f64,
    pub pixel_accuracy: f64,
    /// Mean of per-class accuracies (recall), over classes present.
    pub mean_class_accuracy: f64,
    /// Per class: IoU and accuracy, for classes that occur in truth or prediction.
    pub per_class: BTreeMap<String, ClassScore>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub iou: f64,
    pub accuracy: f64,
    pub pixels: u64,
}

impl Confusion {
    pub fn new(classes: usize, ignore: Option<u32>) -> Confusion {
        Confusion { classes, counts: vec![0; classes * classes], ignore }
    }

    /// Add an image: `truth` and `pred` class indices, same length.
    pub fn add(&mut self, truth: &[u32], pred: &[u32]) {
        for (&t, &p) in truth.iter().zip(pred) {
            if Some(t) == self.ignore || t as usize >= self.classes || p as usize >= self.classes {
                continue;
            }
            self.counts[t as usize * self.classes + p as usize] += 1;
        }
    }

    pub fn scores(&self, names: &[String]) -> SegScores {
        let n = self.classes;
        let row = |t: usize| (0..n).map(|p| self.counts[t * n + p]).sum::<u64>();
        let col = |p: usize| (0..n).map(|t| self.counts[t * n + p]).sum::<u64>();
        let total: u64 = self.counts.iter().sum();
        let correct: u64 = (0..n).map(|c| self.counts[c * n + c]).sum();
        let mut per_class = BTreeMap::new();
        let (mut iou_sum, mut iou_n, mut acc_sum, mut acc_n) = (0.0, 0, 0.0, 0);
        for c in 0..n {
            let tp = self.counts[c * n + c];
            let (truth, predicted) = (row(c), col(c));
            let union = truth + predicted - tp;
            if union == 0 {
                continue;
            }
            let iou = tp as f64 / union as f64;
            let accuracy = if truth > 0 { tp as f64 / truth as f64 } else { 0.0 };
            // A class counts towards the means when it occurs in the ground truth.
            if truth > 0 {
                iou_sum += iou;
                iou_n += 1;
                acc_sum += accuracy;
                acc_n += 1;
            }
            let name = names.get(c).cloned().unwrap_or_else(|| c.to_string());
            per_class.insert(name, ClassScore { iou, accuracy, pixels: truth });
        }
        SegScores {
            miou: iou_sum / iou_n.max(1) as f64,
            pixel_accuracy: correct as f64 / total.max(1) as f64,
            mean_class_accuracy: acc_sum / acc_n.max(1) as f64,
            per_class,
        }
    }
}

/// Depth scores over pixels whose ground truth is valid (> 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthScores {
    pub rmse: f64,
    pub abs_rel: f64,
    /// Share of pixels with max(pred/gt, gt/pred) < 1.25.
    pub delta1: f64,
    pub pixels: u64,
}

/// Accumulates depth errors over images.
#[derive(Debug, Clone, Default)]
pub struct DepthErrors {
    sq: f64,
    rel: f64,
    within: u64,
    n: u64,
}

impl DepthErrors {
    /// Add an image: predicted and true depth, same unit, same length. Pixels whose truth is 0
    /// or not finite (no measurement) are skipped; predictions are clamped to a small positive
    /// value so the ratios exist.
    pub fn add(&mut self, truth: &[f32], pred: &[f32]) {
        for (&t, &p) in truth.iter().zip(pred) {
            if !(t > 0.0 && t.is_finite()) {
                continue;
            }
            let p = (p as f64).max(1e-3);
            let t = t as f64;
            self.sq += (p - t) * (p - t);
            self.rel += (p - t).abs() / t;
            self.within += ((p / t).max(t / p) < 1.25) as u64;
            self.n += 1;
        }
    }

    pub fn scores(&self) -> DepthScores {
        let n = self.n.max(1) as f64;
        DepthScores { rmse: (self.sq / n).sqrt(), abs_rel: self.rel / n, delta1: self.within as f64 / n, pixels: self.n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segmentation_scores_by_hand() {
        // 3 classes, 8 pixels, one ignored (255).
        // truth: 0 0 0 1 1 2 2 255
        // pred:  0 0 1 1 2 2 2 0
        // confusion (truth × pred): 0: [2,1,0]; 1: [0,1,1]; 2: [0,0,2]
        // IoU 0 = 2/(3+2-2) = 2/3; IoU 1 = 1/(2+2-1) = 1/3; IoU 2 = 2/(2+3-2) = 2/3 → mIoU 5/9.
        // pixel accuracy 5/7; class accuracies 2/3, 1/2, 1 → mean 13/18.
        let mut c = Confusion::new(3, Some(255));
        c.add(&[0, 0, 0, 1, 1, 2, 2, 255], &[0, 0, 1, 1, 2, 2, 2, 0]);
        let s = c.scores(&["a".into(), "b".into(), "c".into()]);
        assert!((s.miou - 5.0 / 9.0).abs() < 1e-12, "{s:?}");
        assert!((s.pixel_accuracy - 5.0 / 7.0).abs() < 1e-12);
        assert!((s.mean_class_accuracy - 13.0 / 18.0).abs() < 1e-12);
        assert!((s.per_class["b"].iou - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.per_class["c"].pixels, 2);
        // A class only predicted, never true, lowers no mean but is listed.
        let mut c = Confusion::new(3, None);
        c.add(&[0, 0], &[0, 2]);
        let s = c.scores(&[]);
        assert!((s.miou - 0.5).abs() < 1e-12, "{s:?}");
        assert_eq!(s.per_class["2"].iou, 0.0);
    }

    #[test]
    fn depth_scores_by_hand() {
        // truth 1, 2, 4, (0 = no measurement); pred 1, 3, 2, 5.
        // errors 0, 1, -2 → RMSE sqrt(5/3); AbsRel (0 + 1/2 + 1/2)/3 = 1/3;
        // ratios 1, 1.5, 2 → δ1 = 1/3.
        let mut d = DepthErrors::default();
        d.add(&[1.0, 2.0, 4.0, 0.0], &[1.0, 3.0, 2.0, 5.0]);
        let s = d.scores();
        assert_eq!(s.pixels, 3);
        assert!((s.rmse - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((s.abs_rel - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.delta1 - 1.0 / 3.0).abs() < 1e-12);
    }
}
