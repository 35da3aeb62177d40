//! An image-to-text captioner as `optimum-cli export onnx --task image-to-text-with-past` writes
//! it: `encoder_model.onnx` plus `decoder_model_merged.onnx` (or `decoder_model.onnx` +
//! `decoder_with_past_model.onnx`). Generation runs batched on the encoder output with the past
//! key values carried between steps; rows that finish leave the batch.
//!
//! Greedy and beam search follow Hugging Face `generate()` (transformers 4.57) step for step, so
//! they give the same tokens; sampling applies temperature, then top-k, then top-p, as it does,
//! with a seeded generator per row so that a caption can be reproduced from its sample's seed.

use std::path::{Path, PathBuf};

use image::RgbImage;
use ort::session::Session;
use ort::value::{DynValue, Tensor, TensorElementType as T, TensorRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::hf::{read_json, required, GenerationDefaults, ImageProcessor, TextTokenizer};
use super::runtime::{check_io, expect, input_shape, open_session, run_err, SessionOptions};
use crate::error::{Error, Result};

/// When beam search may stop (Hugging Face's `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop when no running beam can beat the worst finished one at its current length (HF's `False`).
    Heuristic,
    /// Stop as soon as `width` beams have finished (HF's `True`).
    Finished,
    /// Canonical beam search: run until no improvement is possible at all (HF's `"never"`).
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decoding {
    Greedy,
    Beam { width: usize, length_penalty: f32, early_stopping: EarlyStopping },
    Sample { temperature: f32, top_k: usize, top_p: f32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub decoding: Decoding,
    /// Captions per image: independent samples, or the best beams (at most `width`).
    pub num_captions: usize,
    pub max_new_tokens: usize,
}

enum Decoder {
    Merged(Session),
    Split { first: Session, with_past: Session },
}

struct KvSpec {
    past: String,
    present: String,
    heads: usize,
    head_dim: usize,
}

pub struct Captioner {
    pub dir: PathBuf,
    encoder: Session,
    decoder: Decoder,
    kv: Vec<KvSpec>,
    pub processor: ImageProcessor,
    pub tokenizer: TextTokenizer,
    pub generation: GenerationDefaults,
    /// (height, width) of `pixel_values`.
    pub image_hw: (u32, u32),
    /// Largest number of decoder positions (start token included).
    pub max_positions: usize,
}

/// Past key values of the rows in the batch: per KV tensor, [rows, heads, len, head_dim].
struct Past {
    tensors: Vec<Vec<f32>>,
    len: usize,
}

impl Past {
    /// Keep rows in the order given (rows may repeat: beams that share a prefix).
    fn select(&mut self, kv: &[KvSpec], rows: &[usize]) {
        for (t, spec) in self.tensors.iter_mut().zip(kv) {
            let block = spec.heads * self.len * spec.head_dim;
            let mut out = Vec::with_capacity(rows.len() * block);
            for &r in rows {
                out.extend_from_slice(&t[r * block..(r + 1) * block]);
            }
            *t = out;
        }
    }
}

fn select_rows(data: &[f32], row: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * row);
    for &r in rows {
        out.extend_from_slice(&data[r * row..(r + 1) * row]);
    }
    out
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|x| (x - m).exp()).sum::<f32>().ln() + m;
    row.iter().map(|x| x - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Temperature, then top-k, then top-p (nucleus), then a draw.
fn sample(row: &[f32], temperature: f32, top_k: usize, top_p: f32, rng: &mut ChaCha8Rng) -> usize {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|a, b| row[*b].partial_cmp(&row[*a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b)));
    if top_k > 0 && top_k < idx.len() {
        idx.truncate(top_k);
    }
    let m = row[idx[0]] / t;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((row[i] / t - m) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= top_p as f64 {
                keep = n + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u: f64 = rng.random();
    for (n, p) in probs.iter().enumerate() {
        if u < *p {
            return idx[n];
        }
        u -= p;
    }
    idx[idx.len() - 1]
}

impl Captioner {
    pub fn load(dir: &Path, opts: &SessionOptions) -> Result<Captioner> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "not a directory"));
        }
        let processor = ImageProcessor::from_file(&required(dir, "preprocessor_config.json")?)?;
        let generation = GenerationDefaults::load(dir)?;
        let cfg = read_json(&required(dir, "config.json")?)?;
        let dec_cfg = cfg.get("decoder").unwrap_or(&cfg);
        let get = |keys: &[&str]| keys.iter().find_map(|k| dec_cfg.get(*k).and_then(|v| v.as_u64())).map(|v| v as usize);
        let max_positions = get(&["n_positions", "max_position_embeddings"]).unwrap_or(generation.max_length);
        let tokenizer = TextTokenizer::load(dir, max_positions)?;

        let enc_path = required(dir, "encoder_model.onnx")?;
        let encoder = open_session(&enc_path, opts)?;
        check_io(&enc_path, &encoder, &[expect("pixel_values", T::Float32, 4)], &[expect("last_hidden_state", T::Float32, 3)])?;
        let (h, w) = processor.check_fits(&enc_path, input_shape(&encoder, "pixel_values"))?;

        let merged = dir.join("decoder_model_merged.onnx");
        let decoder_inputs = [expect("input_ids", T::Int64, 2), expect("encoder_hidden_states", T::Float32, 3)];
        let logits = [expect("logits", T::Float32, 3)];
        let (decoder, past_session_path) = if merged.is_file() {
            let s = open_session(&merged, opts)?;
            check_io(&merged, &s, &[decoder_inputs[0], decoder_inputs[1], expect("use_cache_branch", T::Bool, 1)], &logits)?;
            (Decoder::Merged(s), merged)
        } else {
            let (fp, wp) = (dir.join("decoder_model.onnx"), dir.join("decoder_with_past_model.onnx"));
            if !(fp.is_file() && wp.is_file()) {
                return Err(Error::model(
                    dir,
                    "no decoder: expected decoder_model_merged.onnx, or decoder_model.onnx and decoder_with_past_model.onnx \
                     (optimum-cli export onnx --task image-to-text-with-past)",
                ));
            }
            let first = open_session(&fp, opts)?;
            check_io(&fp, &first, &decoder_inputs, &logits)?;
            let with_past = open_session(&wp, opts)?;
            check_io(&wp, &with_past, &decoder_inputs, &logits)?;
            (Decoder::Split { first, with_past }, wp)
        };
        let past_session = match &decoder {
            Decoder::Merged(s) => s,
            Decoder::Split { with_past, .. } => with_past,
        };
        let heads_cfg = get(&["n_head", "num_attention_heads"]);
        let width_cfg = get(&["n_embd", "hidden_size", "d_model"]);
        let mut kv = Vec::new();
        for input in past_session.inputs() {
            let Some(suffix) = input.name().strip_prefix("past_key_values.") else { continue };
            let shape: Vec<i64> = input.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
            let dim = |i: usize| shape.get(i).copied().filter(|d| *d > 0).map(|d| d as usize);
            let heads = dim(1).or(heads_cfg);
            let head_dim = dim(3).or_else(|| Some(width_cfg? / heads?));
            let (Some(heads), Some(head_dim)) = (heads, head_dim) else {
                return Err(Error::model(&past_session_path, format!("cannot tell the heads and head size of `{}` (dynamic in the graph, absent from config.json)", input.name())));
            };
            let present = format!("present.{suffix}");
            if !past_session.outputs().iter().any(|o| o.name() == present) {
                return Err(Error::model(&past_session_path, format!("input `{}` has no matching output `{present}`", input.name())));
            }
            kv.push(KvSpec { past: input.name().to_string(), present, heads, head_dim });
        }
        if kv.is_empty() {
            return Err(Error::model(&past_session_path, "no `past_key_values.*` inputs: export with `--task image-to-text-with-past`"));
        }
        let cap = Captioner { dir: dir.to_path_buf(), encoder, decoder, kv, processor, tokenizer, generation, image_hw: (h, w), max_positions };
        Ok(cap)
    }

    pub fn pixel_values(&self, images: &[&RgbImage]) -> std::result::Result<Vec<f32>, String> {
        self.processor.batch(images, self.image_hw)
    }

    /// Run the encoder: ([n * seq * width], seq, width).
    fn encode(&mut self, pixels: Vec<f32>, n: usize) -> std::result::Result<(Vec<f32>, usize, usize), String> {
        let (h, w) = self.image_hw;
        let px = Tensor::from_array(([n, 3, h as usize, w as usize], pixels)).map_err(run_err)?;
        let out = self.encoder.run(ort::inputs! { "pixel_values" => px }).map_err(run_err)?;
        let (shape, data) = out["last_hidden_state"].try_extract_tensor::<f32>().map_err(run_err)?;
        Ok((data.to_vec(), shape[1] as usize, shape[2] as usize))
    }

    /// One decoder step for `rows` rows: logits of the last position [rows * vocab], and the past.
    fn step(&mut self, tokens: &[i64], enc: &[f32], enc_shape: (usize, usize), past: Option<Past>) -> std::result::Result<(Vec<f32>, Past), String> {
        let rows = tokens.len();
        let ids = Tensor::from_array(([rows, 1], tokens.to_vec())).map_err(run_err)?;
        // The encoder states are lent, not copied; the past is moved in (it is replaced by the
        // step's `present` anyway).
        let hidden = TensorRef::from_array_view(([rows, enc_shape.0, enc_shape.1], enc)).map_err(run_err)?;
        let mut inputs: Vec<(std::borrow::Cow<'static, str>, ort::session::SessionInputValue<'_>)> =
            ort::inputs! { "input_ids" => ids, "encoder_hidden_states" => hidden };
        let with_past = past.is_some();
        let p = past.unwrap_or_else(|| Past { tensors: self.kv.iter().map(|_| Vec::new()).collect(), len: 0 });
        let feed_past = matches!(self.decoder, Decoder::Merged(_)) || with_past;
        if feed_past {
            for (spec, data) in self.kv.iter().zip(p.tensors) {
                let t = Tensor::from_array(([rows, spec.heads, p.len, spec.head_dim], data)).map_err(run_err)?;
                inputs.push((spec.past.clone().into(), t.into()));
            }
        }
        let session = match (&mut self.decoder, with_past) {
            (Decoder::Merged(s), _) => {
                let flag = Tensor::from_array(([1usize], vec![with_past])).map_err(run_err)?;
                inputs.push(("use_cache_branch".into(), flag.into()));
                s
            }
            (Decoder::Split { first, .. }, false) => first,
            (Decoder::Split { with_past: s, .. }, true) => s,
        };
        let mut out = session.run(inputs).map_err(run_err)?;
        let (shape, data) = out["logits"].try_extract_tensor::<f32>().map_err(run_err)?;
        let (t, v) = (shape[1] as usize, shape[2] as usize);
        let mut logits = Vec::with_capacity(rows * v);
        for r in 0..rows {
            logits.extend_from_slice(&data[(r * t + t - 1) * v..(r * t + t) * v]);
        }
        let mut tensors = Vec::with_capacity(self.kv.len());
        let mut len = 0;
        for spec in &self.kv {
            let value: DynValue = out.remove(spec.present.as_str()).ok_or_else(|| format!("output `{}` missing", spec.present))?;
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(run_err)?;
            len = shape[2] as usize;
            tensors.push(data.to_vec());
        }
        Ok((logits, Past { tensors, len }))
    }

    /// Generate for a batch of images: per image, `num_captions` token sequences (without the
    /// start token, with the end token when one was produced). `seeds` (one per image) drive
    /// sampling; greedy and beam search ignore them.
    pub fn generate(&mut self, images: &[&RgbImage], seeds: &[u64], opts: &GenerateOptions) -> std::result::Result<Vec<Vec<Vec<u32>>>, String> {
        let pixels = self.pixel_values(images)?;
        self.generate_from_pixels(pixels, images.len(), seeds, opts)
    }

    pub fn generate_from_pixels(&mut self, pixels: Vec<f32>, n: usize, seeds: &[u64], opts: &GenerateOptions) -> std::result::Result<Vec<Vec<Vec<u32>>>, String> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let (enc, s, d) = self.encode(pixels, n)?;
        let max_new = opts.max_new_tokens.min(self.max_positions.saturating_sub(1)).max(1);
        match opts.decoding {
            Decoding::Greedy => self.run_rows(&enc, (s, d), n, 1, max_new, |row, _| argmax(row)),
            Decoding::Sample { temperature, top_k, top_p } => {
                let k = opts.num_captions.max(1);
                let mut rngs: Vec<ChaCha8Rng> = (0..n * k)
                    .map(|r| {
                        let mut g = ChaCha8Rng::seed_from_u64(seeds.get(r / k).copied().unwrap_or(0));
                        g.set_stream((r % k) as u64);
                        g
                    })
                    .collect();
                self.run_rows(&enc, (s, d), n, k, max_new, |row, r| sample(row, temperature, top_k, top_p, &mut rngs[r]))
            }
            Decoding::Beam { width, length_penalty, early_stopping } => {
                self.beam_search(&enc, (s, d), n, width.max(1), opts.num_captions.clamp(1, width.max(1)), length_penalty, early_stopping, max_new)
            }
        }
    }

    /// Independent rows (greedy, sampling): `k` rows per image, each ends at its end token.
    #[allow(clippy::too_many_arguments)]
    fn run_rows(
        &mut self,
        enc: &[f32],
        enc_shape: (usize, usize),
        n: usize,
        k: usize,
        max_new: usize,
        mut choose: impl FnMut(&[f32], usize) -> usize,
    ) -> std::result::Result<Vec<Vec<Vec<u32>>>, String> {
        let row_len = enc_shape.0 * enc_shape.1;
        let total = n * k;
        let mut seqs: Vec<Vec<u32>> = vec![Vec::new(); total];
        let mut active: Vec<usize> = (0..total).collect();
        let mut enc_rows = select_rows(enc, row_len, &active.iter().map(|r| r / k).collect::<Vec<_>>());
        let mut past: Option<Past> = None;
        let start = self.generation.decoder_start_token_id;
        for _ in 0..max_new {
            let tokens: Vec<i64> = active.iter().map(|&r| *seqs[r].last().unwrap_or(&start) as i64).collect();
            let (logits, new_past) = self.step(&tokens, &enc_rows, enc_shape, past.take())?;
            let v = logits.len() / active.len();
            let mut keep = Vec::with_capacity(active.len());
            for (p, &r) in active.iter().enumerate() {
                let tok = choose(&logits[p * v..(p + 1) * v], r) as u32;
                seqs[r].push(tok);
                if !self.generation.eos_token_ids.contains(&tok) {
                    keep.push(p);
                }
            }
            let mut new_past = new_past;
            if keep.len() != active.len() {
                new_past.select(&self.kv, &keep);
                enc_rows = select_rows(&enc_rows, row_len, &keep);
                active = keep.iter().map(|&p| active[p]).collect();
            }
            if active.is_empty() {
                break;
            }
            past = Some(new_past);
        }
        Ok(seqs.chunks(k).map(|c| c.to_vec()).collect())
    }

    /// Beam search as transformers' `_beam_search`: 2×width candidates per step, finished
    /// hypotheses scored with the length penalty, the same stopping rules.
    #[allow(clippy::too_many_arguments)]
    fn beam_search(
        &mut self,
        enc: &[f32],
        enc_shape: (usize, usize),
        n: usize,
        width: usize,
        returned: usize,
        length_penalty: f32,
        early_stopping: EarlyStopping,
        max_new: usize,
    ) -> std::result::Result<Vec<Vec<Vec<u32>>>, String> {
        const NEG: f32 = -1.0e9;
        struct Item {
            running: Vec<Vec<u32>>,
            running_scores: Vec<f32>,
            fin: Vec<Vec<u32>>,
            fin_scores: Vec<f32>,
            fin_done: Vec<bool>,
            unsatisfied: bool,
            done: bool,
        }
        let mut items: Vec<Item> = (0..n)
            .map(|_| Item {
                running: vec![Vec::new(); width],
                running_scores: (0..width).map(|w| if w == 0 { 0.0 } else { NEG }).collect(),
                fin: vec![Vec::new(); width],
                fin_scores: vec![NEG; width],
                fin_done: vec![false; width],
                unsatisfied: true,
                done: false,
            })
            .collect();
        let row_len = enc_shape.0 * enc_shape.1;
        let mut active: Vec<usize> = (0..n).collect();
        let mut enc_rows = select_rows(enc, row_len, &(0..n * width).map(|r| r / width).collect::<Vec<_>>());
        let mut past: Option<Past> = None;
        let start = self.generation.decoder_start_token_id;
        let eos = self.generation.eos_token_ids.clone();
        let prompt_len = 1usize;
        let max_length = prompt_len + max_new;
        let mut cur_len = prompt_len;
        let keep_n = 2.max(1 + eos.len()) * width;
        while !active.is_empty() {
            let tokens: Vec<i64> =
                active.iter().flat_map(|&b| items[b].running.iter().map(|s| *s.last().unwrap_or(&start) as i64).collect::<Vec<_>>()).collect();
            let (logits, mut new_past) = self.step(&tokens, &enc_rows, enc_shape, past.take())?;
            let v = logits.len() / tokens.len();
            // Rows of the next step's batch, as indices into this step's rows.
            let mut next_rows = Vec::new();
            let mut still = Vec::new();
            for (ai, &b) in active.iter().enumerate() {
                let it = &mut items[b];
                let mut acc = Vec::with_capacity(width * v);
                for w in 0..width {
                    let row = ai * width + w;
                    let lp = log_softmax(&logits[row * v..(row + 1) * v]);
                    acc.extend(lp.iter().map(|x| x + it.running_scores[w]));
                }
                let mut order: Vec<usize> = (0..acc.len()).collect();
                order.sort_by(|x, y| acc[*y].partial_cmp(&acc[*x]).unwrap_or(std::cmp::Ordering::Equal).then(x.cmp(y)));
                order.truncate(keep_n);
                let cands: Vec<(f32, usize, Vec<u32>, bool)> = order
                    .iter()
                    .map(|&i| {
                        let (w, tok) = (i / v, (i % v) as u32);
                        let mut seq = it.running[w].clone();
                        seq.push(tok);
                        let hits = eos.contains(&tok) || cur_len + 1 >= max_length;
                        (acc[i], w, seq, hits)
                    })
                    .collect();
                // Next running beams: the best candidates that did not stop.
                let mut run_order: Vec<(f32, usize)> =
                    cands.iter().enumerate().map(|(i, c)| (c.0 + if c.3 { NEG } else { 0.0 }, i)).collect();
                run_order.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(std::cmp::Ordering::Equal).then(x.1.cmp(&y.1)));
                run_order.truncate(width);
                // Finished hypotheses.
                let all_done = it.fin_done.iter().all(|d| *d);
                let norm = ((cur_len + 1 - prompt_len) as f32).powf(length_penalty);
                let mut merged: Vec<(f32, Vec<u32>, bool)> =
                    (0..width).map(|w| (it.fin_scores[w], it.fin[w].clone(), it.fin_done[w])).collect();
                for (i, c) in cands.iter().enumerate() {
                    let just = c.3 && i < width;
                    let mut s = c.0 / norm;
                    if all_done && early_stopping == EarlyStopping::Finished {
                        s += NEG;
                    }
                    if !it.unsatisfied {
                        s += NEG;
                    }
                    if !just {
                        s += NEG;
                    }
                    merged.push((s, c.2.clone(), just));
                }
                let mut mo: Vec<usize> = (0..merged.len()).collect();
                mo.sort_by(|x, y| merged[*y].0.partial_cmp(&merged[*x].0).unwrap_or(std::cmp::Ordering::Equal).then(x.cmp(y)));
                for (w, &m) in mo.iter().take(width).enumerate() {
                    it.fin_scores[w] = merged[m].0;
                    it.fin[w] = merged[m].1.clone();
                    it.fin_done[w] = merged[m].2;
                }
                let all_hit = cands.iter().all(|c| c.3);
                it.running = run_order.iter().map(|(_, i)| cands[*i].2.clone()).collect();
                it.running_scores = run_order.iter().map(|(s, _)| *s).collect();
                let origins: Vec<usize> = run_order.iter().map(|(_, i)| ai * width + cands[*i].1).collect();
                // Early-stop heuristic, evaluated at the new length.
                let len = cur_len + 1;
                let hyp = if early_stopping == EarlyStopping::Never && length_penalty > 0.0 { max_length - prompt_len } else { len - prompt_len };
                let best = it.running_scores[0] / (hyp as f32).powf(length_penalty);
                let worst = it.fin_scores.iter().copied().fold(f32::INFINITY, f32::min);
                it.unsatisfied = it.unsatisfied && it.fin_done.iter().any(|d| best > if *d { worst } else { NEG });
                let finished_all = it.fin_done.iter().all(|d| *d) && early_stopping == EarlyStopping::Finished;
                it.done = !it.unsatisfied || finished_all || all_hit;
                if !it.done {
                    still.push(b);
                    next_rows.extend(origins);
                }
            }
            cur_len += 1;
            if still.is_empty() {
                break;
            }
            new_past.select(&self.kv, &next_rows);
            enc_rows = select_rows(&enc_rows, row_len, &next_rows);
            active = still;
            past = Some(new_past);
        }
        Ok(items.into_iter().map(|it| it.fin.into_iter().take(returned).collect()).collect())
    }

    /// Token ids to text: special tokens dropped, whitespace trimmed, optionally cut after the
    /// first period.
    pub fn decode(&self, ids: &[u32], cut_at_period: bool) -> std::result::Result<String, String> {
        let text = self.tokenizer.decode(ids)?;
        let mut text = text.trim().to_string();
        if cut_at_period {
            if let Some(i) = text.find('.') {
                text.truncate(i + 1);
            }
        }
        Ok(text)
    }
}
