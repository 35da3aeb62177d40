//! AdamW with decoupled weight decay on chosen parameters (PyTorch's `torch.optim.AdamW` update,
//! open_clip's parameter groups), the warmup + cosine schedule, and clipping by global norm.
//! candle-nn's `AdamW` decays every variable and keeps its moments private, so a checkpoint could
//! not hold them: this one's state is plain tensors, saved beside the weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::model::ce;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter's moments.
struct Slot {
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    slots: BTreeMap<String, Slot>,
    pub settings: AdamWSettings,
    /// Updates applied so far (bias correction uses it).
    pub steps: u64,
}

impl AdamW {
    /// `params`: name → (variable, whether it is decayed).
    pub fn new(params: impl IntoIterator<Item = (String, Var, bool)>, settings: AdamWSettings) -> Result<AdamW> {
        let mut slots = BTreeMap::new();
        for (name, var, decay) in params {
            let m = var.as_tensor().zeros_like().map_err(ce("moments"))?;
            let v = m.clone();
            slots.insert(name, Slot { var, decay, m, v });
        }
        Ok(AdamW { slots, settings, steps: 0 })
    }

    /// Global L2 norm of the gradients (every parameter without a gradient counts zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f32> {
        let mut total = 0f64;
        for s in self.slots.values() {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                let n: f32 = g.sqr().and_then(|x| x.sum_all()).and_then(|x| x.to_scalar()).map_err(ce("grad norm"))?;
                total += n as f64;
            }
        }
        Ok(total.sqrt() as f32)
    }

    /// One update at learning rate `lr`; gradients are first scaled by `grad_scale` (clipping).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let AdamWSettings { beta1, beta2, eps, weight_decay } = self.settings;
        let t = self.steps as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        for (name, s) in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            let f = ce(format!("AdamW update of {name}"));
            let mut upd = || -> candle_core::Result<()> {
                let g = if grad_scale != 1.0 { g.affine(grad_scale, 0.0)? } else { g.clone() };
                s.m = ((&s.m * beta1)? + (&g * (1.0 - beta1))?)?;
                s.v = ((&s.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let denom = ((&s.v / bc2)?.sqrt()? + eps)?;
                let step = ((&s.m / bc1)? / denom)?;
                let mut p = s.var.as_tensor().clone();
                if s.decay && weight_decay != 0.0 {
                    p = (p * (1.0 - lr * weight_decay))?;
                }
                let p = (p - (step * lr)?)?;
                s.var.set(&p)
            };
            upd().map_err(f)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`m.<param>`, `v.<param>`), for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, s) in &self.slots {
            out.insert(format!("m.{k}"), s.m.clone());
            out.insert(format!("v.{k}"), s.v.clone());
        }
        out
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state(), path).map_err(|e| Error::model(path, format!("cannot write optimiser state: {e}")))
    }

    /// Restore moments saved by [`AdamW::save`]; `steps` comes from the checkpoint's state file.
    pub fn load(&mut self, path: &Path, steps: u64) -> Result<()> {
        let dev = self.slots.values().next().map(|s| s.var.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let t = candle_core::safetensors::load(path, &dev).map_err(|e| Error::model(path, format!("cannot read optimiser state: {e}")))?;
        for (k, s) in self.slots.iter_mut() {
            for (prefix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let name = format!("{prefix}.{k}");
                let x = t.get(&name).ok_or_else(|| Error::model(path, format!("{name} is missing: the checkpoint is of another model")))?;
                if x.dims() != slot.dims() {
                    return Err(Error::model(path, format!("{name} has shape {:?}, expected {:?}", x.dims(), slot.dims())));
                }
                *slot = x.clone();
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Learning rate at `step` (0-based): linear warmup to `lr` over `warmup` steps (open_clip's
/// `lr * (step + 1) / warmup`), then cosine from `lr` down to `min_lr` at `total`.
pub fn cosine_lr(step: u64, lr: f64, min_lr: f64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let e = ((step - warmup) as f64 / span).min(1.0);
    min_lr + 0.5 * (1.0 + (std::f64::consts::PI * e).cos()) * (lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    // PyTorch 2.15, float64:
    //   p = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    //   opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.2)
    //   for g in ([0.5, -1.0, 2.0], [0.1, 0.3, -0.2]):
    //       p.grad = torch.tensor(g); opt.step()
    //   print(p)  # tools/references/losses.py prints it
    #[test]
    fn adamw_matches_pytorch() {
        let dev = Device::Cpu;
        let v = Var::from_vec(vec![1f32, -2.0, 3.0], 3, &dev).unwrap();
        let mut opt = AdamW::new([("p".to_string(), v.clone(), true)], AdamWSettings { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.2 }).unwrap();
        for g in [[0.5f32, -1.0, 2.0], [0.1, 0.3, -0.2]] {
            // d/dp sum(p · g) = g
            let gt = Tensor::from_vec(g.to_vec(), 3, &dev).unwrap();
            let grads = (v.as_tensor() * &gt).unwrap().sum_all().unwrap().backward().unwrap();
            opt.step(&grads, 0.1, 1.0).unwrap();
        }
        let got: Vec<f32> = v.as_tensor().to_vec1().unwrap();
        for (a, b) in got.iter().zip(REF_ADAMW) {
            assert!((a - b).abs() < 1e-4, "{got:?} vs {REF_ADAMW:?}");
        }
    }
    const REF_ADAMW: [f32; 3] = [0.781147, -1.779559, 2.723191];

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((cosine_lr(0, 1.0, 0.0, 4, 100) - 0.25).abs() < 1e-12);
        assert!((cosine_lr(3, 1.0, 0.0, 4, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(4, 1.0, 0.0, 4, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(52, 1.0, 0.1, 4, 100) - 0.55).abs() < 1e-9);
        assert!((cosine_lr(100, 1.0, 0.1, 4, 100) - 0.1).abs() < 1e-12);
    }
}
