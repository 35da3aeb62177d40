//! Fused CPU ops with hand-written backward passes, for the student's hot path.
//!
//! candle builds a training step from many small ops, and its backward pass gives each node a
//! fresh zeroed gradient buffer to add into; on CPU that bookkeeping, the copies of transposes
//! and the strided reductions behind broadcasts cost several times the maths itself (measured:
//! a tiny-preset step took 7× PyTorch's). Each op here replaces a chain of them with one forward
//! and one backward written out: linear (x Wᵀ + b), layer norm, quick_gelu, the whole attention
//! core (scores, causal mask, softmax, weighted sum; its probabilities kept for the backward when
//! small, else recomputed there as FlashAttention does), and for dense heads a 3×3 convolution as
//! patches × weights and a per-pixel cross-entropy. Every op is checked against the composed
//! candle ops it replaces (values and gradients) in the tests below, and the composed ops stay
//! the path off the CPU.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;


type CResult<T> = candle_core::Result<T>;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// Run `f` on a tensor's data, made contiguous first (CPU only).
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => f(contiguous(s, l, "fused op")?),
        _ => candle_core::bail!("fused CPU op on a non-CPU tensor"),
    }
}

fn tensor(v: Vec<f32>, shape: &Shape, like: &Tensor) -> CResult<Tensor> {
    Tensor::from_vec(v, shape.clone(), like.device())
}

/// Rows handed to one rayon task: enough work to beat the scheduling cost.
fn chunk_rows(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// Layer norm over the last dimension.

struct LayerNorm {
    eps: f32,
}

fn ln_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = row.iter().sum::<f32>() / d;
    let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "recap-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "layer norm input")?;
        let (g, b) = (contiguous(s2, l2, "layer norm weight")?, contiguous(s3, l3, "layer norm bias")?);
        let d = g.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * chunk_rows(d)).zip(x.par_chunks(d * chunk_rows(d))).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let (mean, rstd) = ln_stats(xr, self.eps);
                for i in 0..d {
                    yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, g: &Tensor, _b: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = g.elem_count();
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let (dx, dg, db) = with_data(x, |xv| {
            with_data(dy, |dyv| {
                let rows = xv.len() / d;
                let cr = chunk_rows(d);
                let mut dx = vec![0f32; xv.len()];
                // Per chunk: dx rows, and partial sums of dγ and dβ, added up after.
                let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
                    .par_chunks_mut(d * cr)
                    .enumerate()
                    .map(|(c, dxc)| {
                        let mut dg = vec![0f32; d];
                        let mut db = vec![0f32; d];
                        let mut dxhat = vec![0f32; d];
                        for (r, dxr) in dxc.chunks_mut(d).enumerate() {
                            let row = c * cr + r;
                            let xr = &xv[row * d..(row + 1) * d];
                            let dyr = &dyv[row * d..(row + 1) * d];
                            let (mean, rstd) = ln_stats(xr, self.eps);
                            let (mut m1, mut m2) = (0f32, 0f32);
                            for i in 0..d {
                                let xhat = (xr[i] - mean) * rstd;
                                dg[i] += dyr[i] * xhat;
                                db[i] += dyr[i];
                                dxhat[i] = dyr[i] * gv[i];
                                m1 += dxhat[i];
                                m2 += dxhat[i] * xhat;
                            }
                            let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                            for i in 0..d {
                                let xhat = (xr[i] - mean) * rstd;
                                dxr[i] = rstd * (dxhat[i] - m1 - xhat * m2);
                            }
                        }
                        (dg, db)
                    })
                    .collect();
                let _ = rows;
                let mut dg = vec![0f32; d];
                let mut db = vec![0f32; d];
                for (a, b) in partial {
                    dg.iter_mut().zip(a).for_each(|(s, v)| *s += v);
                    db.iter_mut().zip(b).for_each(|(s, v)| *s += v);
                }
                Ok((dx, dg, db))
            })
        })?;
        Ok((Some(tensor(dx, x.shape(), x)?), Some(tensor(dg, g.shape(), g)?), Some(tensor(db, g.shape(), g)?)))
    }
}

/// (x − mean) / sqrt(var + ε) · γ + β over the last dimension; x contiguous or made so.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(gamma, beta, LayerNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// quick_gelu, x·σ(1.702x): its value and derivative.

fn quick_gelu_fwd(v: f32) -> f32 {
    v / (1.0 + (-1.702 * v).exp())
}

fn quick_gelu_grad(v: f32) -> f32 {
    let s = 1.0 / (1.0 + (-1.702 * v).exp());
    s + 1.702 * v * s * (1.0 - s)
}

// ---------------------------------------------------------------------------------------------
// Linear: y = x Wᵀ + b, x [.., in], W [out, in] (PyTorch's layout), b [out]. One node instead of
// transpose + matmul + broadcast add; the weight gradient comes out in W's own layout.

struct Linear;

fn threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Column sums of a [rows, d] matrix.
fn col_sums(m: &[f32], d: usize) -> Vec<f32> {
    let partial: Vec<Vec<f32>> = m
        .par_chunks(d * chunk_rows(d))
        .map(|c| {
            let mut s = vec![0f32; d];
            for r in c.chunks(d) {
                s.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            s
        })
        .collect();
    let mut out = vec![0f32; d];
    for p in partial {
        out.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    out
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "recap-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (contiguous(s1, l1, "linear input")?, contiguous(s2, l2, "linear weight")?, contiguous(s3, l3, "linear bias")?);
        let (out, inp) = l2.shape().dims2()?;
        let rows = x.len() / inp;
        let mut y = vec![0f32; rows * out];
        // Start from the bias, then accumulate x Wᵀ.
        y.par_chunks_mut(out * chunk_rows(out)).for_each(|c| c.chunks_mut(out).for_each(|r| r.copy_from_slice(b)));
        unsafe {
            gemm::gemm(rows, out, inp, y.as_mut_ptr(), 1, out as isize, true, x.as_ptr(), 1, inp as isize, w.as_ptr(), inp as isize, 1, 1.0, 1.0, false, false, false, threads());
        }
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let (dx, dw, db) = with_data(x, |xv| {
            with_data(w, |wv| {
                with_data(dy, |gv| {
                    let rows = xv.len() / inp;
                    let mut dx = vec![0f32; rows * inp];
                    let mut dw = vec![0f32; out * inp];
                    unsafe {
                        // dx = dy W
                        gemm::gemm(rows, inp, out, dx.as_mut_ptr(), 1, inp as isize, false, gv.as_ptr(), 1, out as isize, wv.as_ptr(), 1, inp as isize, 0.0, 1.0, false, false, false, threads());
                        // dW = dyᵀ x
                        gemm::gemm(out, inp, rows, dw.as_mut_ptr(), 1, inp as isize, false, gv.as_ptr(), out as isize, 1, xv.as_ptr(), 1, inp as isize, 0.0, 1.0, false, false, false, threads());
                    }
                    Ok((dx, dw, col_sums(gv, out)))
                })
            })
        })?;
        Ok((Some(tensor(dx, x.shape(), x)?), Some(tensor(dw, w.shape(), w)?), Some(tensor(db, b.shape(), b)?)))
    }
}

/// x Wᵀ + b over the last dimension of x.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

struct QuickGelu;

impl candle_core::CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "recap-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "quick_gelu input")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16384).zip(x.par_chunks(16384)).for_each(|(yc, xc)| {
            yc.iter_mut().zip(xc).for_each(|(y, x)| *y = quick_gelu_fwd(*x));
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        let dx = with_data(x, |xv| {
            with_data(dy, |gv| {
                let mut dx = vec![0f32; xv.len()];
                dx.par_chunks_mut(16384).zip(xv.par_chunks(16384)).zip(gv.par_chunks(16384)).for_each(|((dc, xc), gc)| {
                    for ((d, x), g) in dc.iter_mut().zip(xc).zip(gc) {
                        *d = g * quick_gelu_grad(*x);
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(tensor(dx, x.shape(), x)?))
    }
}

/// x · σ(1.702 x), OpenAI CLIP's activation.
pub fn quick_gelu(x: &Tensor) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(QuickGelu)
}

// ---------------------------------------------------------------------------------------------
// Attention core: q, k, v [B, T, D] with H heads interleaved in D →
// softmax(q_h k_hᵀ / sqrt(hd) (+ causal mask)) v_h, written back as [B, T, D].

struct Attention {
    heads: usize,
    causal: bool,
    /// The forward's probabilities, kept for the backward when they are small enough
    /// ([`KEEP_PROBS_BYTES`]); otherwise the backward recomputes them.
    probs: std::sync::Mutex<Option<Vec<f32>>>,
    keep_limit: usize,
}

/// Largest attention-probability buffer kept from forward to backward, per layer.
const KEEP_PROBS_BYTES: usize = 64 << 20;

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// dst[m×n] (+)= lhs[m×k] · rhs[k×n], all strided (row stride, column stride), single-threaded.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(m: usize, n: usize, k: usize, dst: *mut f32, d_rs: usize, d_cs: usize, acc: bool, lhs: *const f32, l_rs: usize, l_cs: usize, rhs: *const f32, r_rs: usize, r_cs: usize, beta: f32) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        d_cs as isize,
        d_rs as isize,
        acc,
        lhs,
        l_cs as isize,
        l_rs as isize,
        rhs,
        r_cs as isize,
        r_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl Attention {
    /// The probabilities P [T, T] of head h of batch b, from q and k.
    fn probs(&self, q: &[f32], k: &[f32], b: usize, h: usize, t: usize, d: usize, p: &mut [f32]) {
        let hd = d / self.heads;
        let scale = (hd as f32).powf(-0.5);
        let off = b * t * d + h * hd;
        unsafe { mm(t, t, hd, p.as_mut_ptr(), t, 1, false, q.as_ptr().add(off), d, 1, k.as_ptr().add(off), 1, d, scale) };
        for i in 0..t {
            let row = &mut p[i * t..(i + 1) * t];
            let valid = if self.causal { i + 1 } else { t };
            let max = row[..valid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // Exponentials first (a loop that vectorises), then their sum.
            for x in row[..valid].iter_mut() {
                *x = fast_exp(*x - max);
            }
            let sum: f32 = row[..valid].iter().sum();
            let inv = 1.0 / sum;
            row[..valid].iter_mut().for_each(|x| *x *= inv);
            row[valid..].iter_mut().for_each(|x| *x = 0.0);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "recap-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (q, k, v) = (contiguous(s1, l1, "q")?, contiguous(s2, l2, "k")?, contiguous(s3, l3, "v")?);
        let (b, t, d) = l1.shape().dims3()?;
        let hd = d / self.heads;
        let mut out = vec![0f32; q.len()];
        let o = Ptr(out.as_mut_ptr());
        let keep = b * self.heads * t * t * 4 <= self.keep_limit;
        let mut all = if keep { vec![0f32; b * self.heads * t * t] } else { Vec::new() };
        let kept = Ptr(all.as_mut_ptr());
        (0..b * self.heads).into_par_iter().for_each_init(
            || vec![0f32; t * t],
            |p, job| {
                let (bi, h) = (job / self.heads, job % self.heads);
                let (o, kept) = (o, kept);
                // Each (b, h) writes its own columns of its own rows, and its own block of the
                // kept probabilities: disjoint.
                let p: &mut [f32] = if keep { unsafe { std::slice::from_raw_parts_mut(kept.0.add(job * t * t), t * t) } } else { p };
                self.probs(q, k, bi, h, t, d, p);
                let off = bi * t * d + h * hd;
                unsafe { mm(t, hd, t, o.0.add(off), d, 1, false, p.as_ptr(), t, 1, v.as_ptr().add(off), d, 1, 1.0) };
            },
        );
        if keep {
            if let Ok(mut g) = self.probs.lock() {
                *g = Some(all);
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _res: &Tensor, dout: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, d) = q.dims3()?;
        let hd = d / self.heads;
        let scale = (hd as f32).powf(-0.5);
        let kept: Option<Vec<f32>> = self.probs.lock().ok().and_then(|mut g| g.take());
        let kept = kept.filter(|k| k.len() == b * self.heads * t * t);
        let (dq, dk, dv) = with_data(q, |qv| {
            with_data(k, |kv| {
                with_data(v, |vv| {
                    with_data(dout, |gv| {
                        let mut dq = vec![0f32; qv.len()];
                        let mut dk = vec![0f32; qv.len()];
                        let mut dv = vec![0f32; qv.len()];
                        let (pq, pk, pv) = (Ptr(dq.as_mut_ptr()), Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()));
                        (0..b * self.heads).into_par_iter().for_each_init(
                            || (vec![0f32; t * t], vec![0f32; t * t]),
                            |(p, dp), job| {
                                let (bi, h) = (job / self.heads, job % self.heads);
                                let p: &[f32] = match &kept {
                                    Some(all) => &all[job * t * t..(job + 1) * t * t],
                                    None => {
                                        self.probs(qv, kv, bi, h, t, d, p);
                                        p
                                    }
                                };
                                let off = bi * t * d + h * hd;
                                let (pq, pk, pv) = (pq, pk, pv);
                                unsafe {
                                    // dV = Pᵀ dO
                                    mm(t, hd, t, pv.0.add(off), d, 1, false, p.as_ptr(), 1, t, gv.as_ptr().add(off), d, 1, 1.0);
                                    // dP = dO Vᵀ
                                    mm(t, t, hd, dp.as_mut_ptr(), t, 1, false, gv.as_ptr().add(off), d, 1, vv.as_ptr().add(off), 1, d, 1.0);
                                }
                                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the scale of S.
                                for i in 0..t {
                                    let (pr, dr) = (&p[i * t..(i + 1) * t], &mut dp[i * t..(i + 1) * t]);
                                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                                    for j in 0..t {
                                        dr[j] = pr[j] * (dr[j] - dot) * scale;
                                    }
                                }
                                unsafe {
                                    // dQ = dS K; dK = dSᵀ Q
                                    mm(t, hd, t, pq.0.add(off), d, 1, false, dp.as_ptr(), t, 1, kv.as_ptr().add(off), d, 1, 1.0);
                                    mm(t, hd, t, pk.0.add(off), d, 1, false, dp.as_ptr(), 1, t, qv.as_ptr().add(off), d, 1, 1.0);
                                }
                            },
                        );
                        Ok((dq, dk, dv))
                    })
                })
            })
        })?;
        Ok((Some(tensor(dq, q.shape(), q)?), Some(tensor(dk, k.shape(), k)?), Some(tensor(dv, v.shape(), v)?)))
    }
}

/// Multi-head attention of q, k, v [B, T, D] (heads interleaved in D, as the projections make
/// them), causal or not → [B, T, D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> CResult<Tensor> {
    attention_kept(q, k, v, heads, causal, KEEP_PROBS_BYTES)
}

fn attention_kept(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, keep_limit: usize) -> CResult<Tensor> {
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { heads, causal, probs: std::sync::Mutex::new(None), keep_limit })
}

// ---------------------------------------------------------------------------------------------
// 3×3 patches (padding 1, stride 1), for convolutions as a matrix product: x [B, C, H, W] →
// [B, H·W, C·9], column c·9 + ky·3 + kx; the backward scatters the gradients back.

struct Im2Col3;

impl candle_core::CustomOp1 for Im2Col3 {
    fn name(&self) -> &'static str {
        "recap-im2col3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "im2col input")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let k = c * 9;
        let mut out = vec![0f32; b * h * w * k];
        out.par_chunks_mut(w * k).enumerate().for_each(|(row, o)| {
            let (bi, y) = (row / h, row % h);
            for xx in 0..w {
                let cell = &mut o[xx * k..(xx + 1) * k];
                for ci in 0..c {
                    let plane = &x[(bi * c + ci) * h * w..(bi * c + ci + 1) * h * w];
                    for ky in 0..3 {
                        let sy = y as isize + ky as isize - 1;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        for kx in 0..3 {
                            let sx = xx as isize + kx as isize - 1;
                            if sx >= 0 && sx < w as isize {
                                cell[ci * 9 + ky * 3 + kx] = plane[sy as usize * w + sx as usize];
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h * w, k))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let k = c * 9;
        let dx = with_data(g, |gv| {
            let mut dx = vec![0f32; b * c * h * w];
            // One task per (batch, channel) plane: each writes only its own plane.
            dx.par_chunks_mut(h * w).enumerate().for_each(|(plane, d)| {
                let (bi, ci) = (plane / c, plane % c);
                for y in 0..h {
                    for xx in 0..w {
                        let cell = &gv[((bi * h + y) * w + xx) * k..((bi * h + y) * w + xx + 1) * k];
                        for ky in 0..3 {
                            let sy = y as isize + ky as isize - 1;
                            if sy < 0 || sy >= h as isize {
                                continue;
                            }
                            for kx in 0..3 {
                                let sx = xx as isize + kx as isize - 1;
                                if sx >= 0 && sx < w as isize {
                                    d[sy as usize * w + sx as usize] += cell[ci * 9 + ky * 3 + kx];
                                }
                            }
                        }
                    }
                }
            });
            Ok(dx)
        })?;
        Ok(Some(tensor(dx, x.shape(), x)?))
    }
}

/// A 3×3 convolution, padding 1, stride 1, as patches × weights: x [B, C, H, W], w [O, C, 3, 3]
/// (PyTorch's layout), b [O] → [B, H·W, O] (channel-last, ready for a following 1×1 layer).
pub fn conv3x3_channels_last(x: &Tensor, w: &Tensor, b: &Tensor) -> CResult<Tensor> {
    let (o, c, _, _) = w.dims4()?;
    let cols = x.contiguous()?.apply_op1(Im2Col3)?;
    linear(&cols, &w.reshape((o, c * 9))?, b)
}

// ---------------------------------------------------------------------------------------------
// Per-pixel cross-entropy: logits [B, C, H, W] (channels first, as heads make them) and a label
// per pixel → the mean of −log softmax at the label over pixels whose label is a class
// (others, e.g. an ignore index, are skipped). One op instead of a transpose, a log-softmax of
// five ops, a gather and a masked mean.

struct PixelCrossEntropy {
    labels: Vec<u32>,
    /// The forward's softmax, kept for the backward of the same logits when it is small enough.
    probs: std::sync::Mutex<Option<Vec<f32>>>,
}

/// Softmax probabilities kept between forward and backward up to this many bytes (else the
/// backward recomputes them).
const KEEP_PIXEL_PROBS_BYTES: usize = 256 << 20;

impl PixelCrossEntropy {
    /// Softmax over the classes of one image's logits `x` [C, HW] into `p` [C, HW], plane by
    /// plane so that the loops vectorise; `lse` [HW] gets each pixel's log-sum-exp.
    fn softmax_planes(x: &[f32], c: usize, hw: usize, p: &mut [f32], lse: &mut [f32]) {
        lse.fill(f32::NEG_INFINITY);
        for k in 0..c {
            for (m, &v) in lse.iter_mut().zip(&x[k * hw..(k + 1) * hw]) {
                *m = m.max(v);
            }
        }
        let mut sum = vec![0f32; hw];
        for k in 0..c {
            let (xp, pp) = (&x[k * hw..(k + 1) * hw], &mut p[k * hw..(k + 1) * hw]);
            for i in 0..hw {
                let e = fast_exp(xp[i] - lse[i]);
                pp[i] = e;
                sum[i] += e;
            }
        }
        for i in 0..hw {
            lse[i] += sum[i].ln();
            sum[i] = 1.0 / sum[i];
        }
        for k in 0..c {
            for (v, inv) in p[k * hw..(k + 1) * hw].iter_mut().zip(&sum) {
                *v *= inv;
            }
        }
    }

    /// Probabilities of every image (in parallel over the batch) and the summed loss.
    fn forward(&self, x: &[f32], b: usize, c: usize, hw: usize) -> (Vec<f32>, f64) {
        let mut p = vec![0f32; x.len()];
        let total: f64 = p
            .par_chunks_mut(c * hw)
            .zip(x.par_chunks(c * hw))
            .zip(self.labels.par_chunks(hw))
            .map(|((p, x), labels)| {
                let mut lse = vec![0f32; hw];
                Self::softmax_planes(x, c, hw, p, &mut lse);
                let mut t = 0f64;
                for (i, &l) in labels.iter().enumerate() {
                    if (l as usize) < c {
                        t += (lse[i] - x[l as usize * hw + i]) as f64;
                    }
                }
                t
            })
            .sum();
        debug_assert_eq!(p.len(), b * c * hw);
        (p, total)
    }

    fn valid(&self, c: usize) -> usize {
        self.labels.iter().filter(|&&l| (l as usize) < c).count()
    }
}

impl candle_core::CustomOp1 for PixelCrossEntropy {
    fn name(&self) -> &'static str {
        "recap-pixel-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "logits")?;
        let (b, c, h, w) = l.shape().dims4()?;
        if self.labels.len() != b * h * w {
            candle_core::bail!("{} labels for {} pixels", self.labels.len(), b * h * w);
        }
        let (p, total) = self.forward(x, b, c, h * w);
        if p.len() * 4 <= KEEP_PIXEL_PROBS_BYTES {
            *self.probs.lock().expect("not poisoned") = Some(p);
        }
        let n = self.valid(c).max(1) as f64;
        Ok((CpuStorage::F32(vec![(total / n) as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        let (b, c, h, w) = x.dims4()?;
        let scale = g.to_scalar::<f32>()? / self.valid(c).max(1) as f32;
        let hw = h * w;
        let kept = self.probs.lock().expect("not poisoned").take().filter(|p| p.len() == b * c * hw);
        let mut dx = match kept {
            Some(p) => p,
            None => with_data(x, |xv| Ok(self.forward(xv, b, c, hw).0))?,
        };
        // d loss / d x = (p − onehot(label)) / n at labelled pixels, 0 elsewhere.
        dx.par_chunks_mut(c * hw).zip(self.labels.par_chunks(hw)).for_each(|(d, labels)| {
            for (i, &l) in labels.iter().enumerate() {
                if (l as usize) < c {
                    d[l as usize * hw + i] -= 1.0;
                } else {
                    for k in 0..c {
                        d[k * hw + i] = 0.0;
                    }
                }
            }
            d.iter_mut().for_each(|v| *v *= scale);
        });
        Ok(Some(tensor(dx, x.shape(), x)?))
    }
}

/// e^x for f32 within a few ulp (Cephes' expf: x = n·ln2 + r with |r| ≤ ln2/2, a degree-6
/// polynomial for e^r, 2^n through the exponent bits), with no call and no branch so that loops
/// over slices vectorise; the softmaxes of training spend most of their time here. Inputs are
/// clamped to [-87, 88] (e^-87 ≈ 1.6e-38 stands for 0).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Mean per-pixel cross-entropy of logits [B, C, H, W] against `labels` (B·H·W; values ≥ C are
/// skipped).
pub fn pixel_cross_entropy(logits: &Tensor, labels: Vec<u32>) -> CResult<Tensor> {
    logits.contiguous()?.apply_op1(PixelCrossEntropy { labels, probs: std::sync::Mutex::new(None) })
}

// ---------------------------------------------------------------------------------------------
// Bilinear resizing as two matrix products (candle's upsample_bilinear2d has no backward).

/// The [out, in] matrix that resizes one axis by linear interpolation, as PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False)` does: output i samples the input at
/// (i + 0.5)·in/out − 0.5, clamped at 0, from its two neighbours.
pub fn interpolation_matrix(out: usize, inp: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for i in 0..out {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let l = (src - i0 as f64) as f32;
        m[i * inp + i0] += 1.0 - l;
        m[i * inp + i1] += l;
    }
    m
}

/// Resize x [B, C, h, w] to [B, C, H, W] bilinearly: Ah · x · Awᵀ, whose backward is two matrix
/// products too.
pub fn upsample_bilinear(x: &Tensor, size: (usize, usize)) -> CResult<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = size;
    let ah = Tensor::from_vec(interpolation_matrix(oh, h), (oh, h), x.device())?;
    let aw_t = Tensor::from_vec(interpolation_matrix(ow, w), (ow, w), x.device())?.t()?;
    // Rows: [B·C·h, w] · Awᵀ → [B·C·h, W]; then per map, Ah · [h, W].
    let y = x.reshape((b * c * h, w))?.matmul(&aw_t)?.reshape((b * c, h, ow))?;
    let y = ah.broadcast_left(b * c)?.matmul(&y)?;
    y.reshape((b, c, oh, ow))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn fast_exp_is_exp_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (fast_exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_37;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1e-37 && fast_exp(-1000.0) >= 0.0);
        assert!(fast_exp(f32::NAN).is_nan());
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < tol, "{what}: fused and composed differ by {d}");
    }

    fn var(dims: &[usize], seed: u64) -> Var {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = dims.iter().product();
        Var::from_vec((0..n).map(|_| r.random_range(-1.0f32..1.0)).collect(), dims, &Device::Cpu).unwrap()
    }

    /// Value and gradients of a fused op against the composed candle ops, through a random
    /// weighting of the output (so every output element's gradient differs).
    fn check(inputs: &[&Var], fused: impl Fn() -> Tensor, composed: &dyn Fn() -> Tensor, what: &str) {
        let yf = fused();
        let yc = composed();
        close(&yf, &yc, 1e-5, what);
        let w = var(yf.dims(), 99).as_tensor().clone();
        let gf = (&yf * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, x) in inputs.iter().enumerate() {
            close(gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap(), 1e-4, &format!("{what}: gradient of input {i}"));
        }
    }

    /// tests/vectors/bilinear.json, from PyTorch's F.interpolate (tools/references/bilinear.py).
    #[test]
    fn bilinear_upsampling_and_its_gradient_match_pytorch() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/bilinear.json");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let f32s = |x: &serde_json::Value| -> Vec<f32> { x.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect() };
        for case in v["cases"].as_array().unwrap() {
            let dims: Vec<usize> = case["input_shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let size = (case["size"][0].as_u64().unwrap() as usize, case["size"][1].as_u64().unwrap() as usize);
            let x = Var::from_vec(f32s(&case["input"]), dims.as_slice(), &Device::Cpu).unwrap();
            let y = upsample_bilinear(x.as_tensor(), size).unwrap();
            assert_eq!(y.dims(), [dims[0], dims[1], size.0, size.1]);
            let w = Tensor::from_vec(f32s(&case["weight"]), y.dims(), &Device::Cpu).unwrap();
            close(&y, &Tensor::from_vec(f32s(&case["output"]), y.dims(), &Device::Cpu).unwrap(), 1e-5, "bilinear output");
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let want = Tensor::from_vec(f32s(&case["grad"]), dims.as_slice(), &Device::Cpu).unwrap();
            close(g.get(x.as_tensor()).unwrap(), &want, 1e-4, "bilinear gradient");
        }
    }

    #[test]
    fn pixel_cross_entropy_matches_the_composed_loss() {
        let x = var(&[2, 3, 2, 2], 31);
        let labels = vec![0, 2, 1, 9, 2, 2, 0, 1];
        let composed = || {
            let flat = x.permute((0, 2, 3, 1)).unwrap().reshape((8, 3)).unwrap();
            let lsm = candle_nn::ops::log_softmax(&flat, D::Minus1).unwrap();
            let idx = Tensor::from_vec(labels.iter().map(|&l| l.min(2)).collect::<Vec<u32>>(), (8, 1), &Device::Cpu).unwrap();
            let valid = Tensor::from_vec(labels.iter().map(|&l| if l < 3 { 1f32 } else { 0.0 }).collect::<Vec<f32>>(), 8, &Device::Cpu).unwrap();
            (lsm.gather(&idx, 1).unwrap().squeeze(1).unwrap() * valid).unwrap().sum_all().unwrap().affine(-1.0 / 7.0, 0.0).unwrap()
        };
        check(&[&x], || pixel_cross_entropy(&x, labels.clone()).unwrap(), &composed, "pixel cross-entropy");
    }

    #[test]
    fn conv3x3_matches_candles_conv2d() {
        let (x, w, b) = (var(&[2, 3, 5, 4], 21), var(&[6, 3, 3, 3], 22), var(&[6], 23));
        let composed = || {
            let y = x.conv2d(&w, 1, 1, 1, 1).unwrap().broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap()).unwrap();
            y.flatten_from(2).unwrap().transpose(1, 2).unwrap()
        };
        check(&[&x, &w, &b], || conv3x3_channels_last(&x, &w, &b).unwrap(), &composed, "conv3x3");
    }

    #[test]
    fn layer_norm_matches_the_composed_ops() {
        let (x, g, b) = (var(&[3, 5, 16], 1), var(&[16], 2), var(&[16], 3));
        check(&[&x, &g, &b], || layer_norm(&x, &g, &b, 1e-5).unwrap(), &|| super::super::model::layer_norm_composed(&x, &g, &b).unwrap(), "layer norm");
    }

    #[test]
    fn quick_gelu_matches_the_composed_ops() {
        let x = var(&[4, 9], 13);
        check(&[&x], || quick_gelu(&x).unwrap(), &|| (x.as_tensor() * candle_nn::ops::sigmoid(&(x.as_tensor() * 1.702).unwrap()).unwrap()).unwrap(), "quick_gelu");
    }

    #[test]
    fn linear_matches_the_composed_ops() {
        let (x, w, b) = (var(&[3, 5, 12], 10), var(&[7, 12], 11), var(&[7], 12));
        let composed = || x.reshape((15, 12)).unwrap().matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap().reshape((3, 5, 7)).unwrap();
        check(&[&x, &w, &b], || linear(&x, &w, &b).unwrap(), &composed, "linear");
    }

    #[test]
    fn attention_matches_the_composed_ops() {
        let (bs, t, heads, d) = (2, 6, 2, 8);
        let (q, k, v) = (var(&[bs, t, d], 6), var(&[bs, t, d], 7), var(&[bs, t, d], 8));
        for causal in [false, true] {
            let composed = || {
                let split = |x: &Var| x.reshape((bs, t, heads, d / heads)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
                let (qh, kh, vh) = (split(&q), split(&k), split(&v));
                let mut s = (qh.matmul(&kh.t().unwrap()).unwrap() * ((d / heads) as f64).powf(-0.5)).unwrap();
                if causal {
                    let m: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { -1e9 } else { 0.0 }).collect();
                    s = s.broadcast_add(&Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap()).unwrap();
                }
                let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
                p.matmul(&vh).unwrap().transpose(1, 2).unwrap().reshape((bs, t, d)).unwrap()
            };
            check(&[&q, &k, &v], || attention(&q, &k, &v, heads, causal).unwrap(), &composed, &format!("attention causal={causal}"));
            // The backward that recomputes the probabilities (large inputs) too.
            check(&[&q, &k, &v], || attention_kept(&q, &k, &v, heads, causal, 0).unwrap(), &composed, &format!("attention causal={causal}, recomputed"));
        }
    }
}
