//! `recap export webdataset`: reinforced shards as webdataset tar files in DataCompDR's member
//! layout, for open_clip's loader and the `webdataset` package.
//!
//! Per sample (key = the row's `key`, digits only, so webdataset's split at the first dot is
//! clean): `<key>.jpg` (or `.png`/`.webp`, the stored image as it is), `<key>.txt` (alt-text),
//! `<key>.url.txt`, `<key>.syn.json` (`{"syn_text": [...]}`), `<key>.paug.json`
//! (`{"param_aug": [...]}`, one record per view, the original first), `<key>.npz` (`image_emb`
//! [1 + A, D] and `text_emb` [1 + K, D], float16, as numpy's `savez` writes them) and
//! `<key>.json` (uid, sha256, key, clip scores, sizes, status). Members a row lacks (a plain run
//! has no embeddings) are left out. Tars are written under a temporary name and renamed, and
//! `manifest.json` lists them with their sample counts.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch, StructArray};
use arrow::datatypes::{Float16Type, Float32Type, UInt32Type};
use serde_json::json;

use crate::error::{Error, Result};
use crate::sink;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub samples_per_tar: u64,
    /// Statuses exported (default: ok).
    pub statuses: Vec<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { samples_per_tar: 10_000, statuses: vec!["ok".into()] }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportSummary {
    pub rows: u64,
    pub samples: u64,
    pub tars: Vec<(String, u64)>,
    pub bytes: u64,
}

/// A tar file being written: ustar headers, 512-byte blocks, two zero blocks at the end.
struct TarWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    samples: u64,
    bytes: u64,
}

impl TarWriter {
    fn create(path: PathBuf) -> Result<Self> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("shard.tar").to_string();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        let f = File::create(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        Ok(TarWriter { out: BufWriter::new(f), tmp, path, samples: 0, bytes: 0 })
    }

    fn member(&mut self, name: &str, data: &[u8]) -> Result<()> {
        if name.len() > 99 {
            return Err(Error::Internal(format!("tar member name too long: {name}")));
        }
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8], at: usize, len: usize, v: u64| {
            let s = format!("{v:0w$o}\0", w = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, 0o644);
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| b as u64).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        let pad = (512 - data.len() % 512) % 512;
        let io = |e| Error::io("cannot write", &self.tmp, e);
        self.out.write_all(&h).map_err(io)?;
        self.out.write_all(data).map_err(|e| Error::io("cannot write", &self.tmp, e))?;
        self.out.write_all(&vec![0u8; pad]).map_err(|e| Error::io("cannot write", &self.tmp, e))?;
        self.bytes += 512 + data.len() as u64 + pad as u64;
        Ok(())
    }

    fn finish(mut self) -> Result<(PathBuf, u64, u64)> {
        self.out.write_all(&[0u8; 1024]).map_err(|e| Error::io("cannot write", &self.tmp, e))?;
        let f = self.out.into_inner().map_err(|e| Error::io("cannot write", &self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io("cannot sync", &self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io("cannot rename into place", &self.path, e))?;
        Ok((self.path, self.samples, self.bytes + 1024))
    }
}

/// A `.npy` file (format 1.0) of a float16 matrix.
fn npy_f16(rows: usize, cols: usize, data: &[half::f16]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f2', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 2);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    out
}

/// An `.npz` (a zip of `.npy` files, stored uncompressed as `numpy.savez` writes it).
fn npz(arrays: &[(&str, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, data) in arrays {
            z.start_file(format!("{name}.npy"), opts).map_err(|e| Error::Internal(format!("npz: {e}")))?;
            z.write_all(data).map_err(|e| Error::Internal(format!("npz: {e}")))?;
        }
        z.finish().map_err(|e| Error::Internal(format!("npz: {e}")))?;
    }
    Ok(buf.into_inner())
}

/// A list<fixed_size_list<f16, D>> row as (rows, D, values).
fn matrix(b: &RecordBatch, col: &str, i: usize) -> Option<(usize, usize, Vec<half::f16>)> {
    let l = b.column_by_name(col)?.as_list_opt::<i32>()?;
    if l.is_null(i) || l.value_length(i) == 0 {
        return None;
    }
    let m = l.value(i);
    let f = m.as_fixed_size_list();
    let d = f.value_length() as usize;
    let mut out = Vec::with_capacity(f.len() * d);
    for r in 0..f.len() {
        out.extend_from_slice(f.value(r).as_primitive::<Float16Type>().values());
    }
    Some((f.len(), d, out))
}

fn string_list(b: &RecordBatch, col: &str, i: usize) -> Option<Vec<String>> {
    let l = b.column_by_name(col)?.as_list_opt::<i32>()?;
    if l.is_null(i) {
        return None;
    }
    let v = l.value(i);
    let s = v.as_string::<i32>();
    Some((0..s.len()).map(|k| s.value(k).to_string()).collect())
}

fn aug_records(b: &RecordBatch, i: usize) -> Option<serde_json::Value> {
    let l = b.column_by_name("augmentations")?.as_list_opt::<i32>()?;
    if l.is_null(i) {
        return None;
    }
    let v = l.value(i);
    let s: &StructArray = v.as_struct();
    let u = |n: &str, k: usize| s.column_by_name(n).map(|c| c.as_primitive::<UInt32Type>().value(k)).unwrap_or(0);
    let flip = s.column_by_name("flip").map(|c| c.as_boolean().clone());
    let ops = s.column_by_name("ops").map(|c| c.as_list::<i32>().clone());
    let recs: Vec<serde_json::Value> = (0..s.len())
        .map(|k| {
            let op_list: Vec<serde_json::Value> = ops
                .as_ref()
                .map(|o| {
                    let ov = o.value(k);
                    let os = ov.as_struct();
                    let names = os.column(0).as_string::<i32>();
                    let vals = os.column(1).as_primitive::<Float32Type>();
                    (0..os.len()).map(|j| json!([names.value(j), vals.value(j)])).collect()
                })
                .unwrap_or_default();
            json!({
                "crop": [u("crop_x", k), u("crop_y", k), u("crop_w", k), u("crop_h", k)],
                "flip": flip.as_ref().map(|f| f.value(k)).unwrap_or(false),
                "ops": op_list,
            })
        })
        .collect();
    Some(json!({ "param_aug": recs }))
}

/// Export the shards `spec` names to `out` as webdataset tars.
pub fn webdataset(spec: &str, out: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    if opts.samples_per_tar == 0 {
        return Err(Error::Usage("--samples-per-tar must be at least 1".into()));
    }
    let files = sink::list_shards(spec)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io("cannot create", out, e))?;
    let mut s = ExportSummary::default();
    let mut tar: Option<TarWriter> = None;
    let mut next_tar = 0u64;
    for f in &files {
        let b = sink::open_shard(f)?;
        for c in ["key", "status", "url", "caption", "image"] {
            if b.schema().field_with_name(c).is_err() {
                return Err(Error::input(f, format!("has no column {c}; expected a shard written by `recap run`")));
            }
        }
        let reader = b.with_batch_size(256).build().map_err(|e| Error::data(format!("reading {}", f.display()), e))?;
        for batch in reader {
            let batch = batch.map_err(|e| Error::data(format!("reading {}", f.display()), e))?;
            let key = batch.column_by_name("key").expect("checked").as_string::<i32>();
            let status = batch.column_by_name("status").expect("checked").as_string::<i32>();
            let url = batch.column_by_name("url").expect("checked").as_string::<i32>();
            let cap = batch.column_by_name("caption").expect("checked").as_string::<i32>();
            let image = batch.column_by_name("image").expect("checked").as_struct();
            let img_bytes = image.column(0).as_binary::<i32>();
            let img_path = image.column(1).as_string::<i32>();
            let opt_str = |name: &str, i: usize| {
                batch.column_by_name(name).and_then(|c| c.as_string_opt::<i32>().map(|a| a.is_valid(i).then(|| a.value(i).to_string()))).flatten()
            };
            let clip = batch.column_by_name("clip_score").map(|c| c.as_primitive::<Float32Type>().clone());
            let syn_scores = batch.column_by_name("synthetic_clip_scores").map(|c| c.as_list::<i32>().clone());
            let width = batch.column_by_name("width").map(|c| c.as_primitive::<UInt32Type>().clone());
            let height = batch.column_by_name("height").map(|c| c.as_primitive::<UInt32Type>().clone());
            for i in 0..batch.num_rows() {
                s.rows += 1;
                if !opts.statuses.iter().any(|st| st == status.value(i)) {
                    continue;
                }
                let k = key.value(i);
                if k.contains('.') || k.contains('/') {
                    return Err(Error::input(f, format!("key {k:?} has a dot or slash; webdataset keys cannot")));
                }
                if tar.is_none() {
                    tar = Some(TarWriter::create(out.join(format!("{next_tar:05}.tar")))?);
                    next_tar += 1;
                }
                let t = tar.as_mut().expect("open");
                if image.is_valid(i) && img_bytes.is_valid(i) {
                    let ext = if img_path.is_valid(i) { img_path.value(i).rsplit('.').next().unwrap_or("jpg") } else { "jpg" };
                    t.member(&format!("{k}.{ext}"), img_bytes.value(i))?;
                }
                if cap.is_valid(i) {
                    t.member(&format!("{k}.txt"), cap.value(i).as_bytes())?;
                }
                if url.is_valid(i) {
                    t.member(&format!("{k}.url.txt"), url.value(i).as_bytes())?;
                }
                if let Some(syn) = string_list(&batch, "synthetic_captions", i) {
                    t.member(&format!("{k}.syn.json"), json!({ "syn_text": syn }).to_string().as_bytes())?;
                }
                if let Some(p) = aug_records(&batch, i) {
                    t.member(&format!("{k}.paug.json"), p.to_string().as_bytes())?;
                }
                let (ie, te) = (matrix(&batch, "image_embeddings", i), matrix(&batch, "text_embeddings", i));
                if ie.is_some() || te.is_some() {
                    let mut arrays = Vec::new();
                    if let Some((r, d, v)) = ie {
                        arrays.push(("image_emb", npy_f16(r, d, &v)));
                    }
                    if let Some((r, d, v)) = te {
                        arrays.push(("text_emb", npy_f16(r, d, &v)));
                    }
                    t.member(&format!("{k}.npz"), &npz(&arrays)?)?;
                }
                let syn_sc: Option<Vec<f32>> = syn_scores.as_ref().and_then(|l| {
                    l.is_valid(i).then(|| l.value(i).as_primitive::<Float32Type>().values().to_vec())
                });
                let meta = json!({
                    "key": k,
                    "uid": opt_str("uid", i),
                    "sha256": opt_str("sha256", i),
                    "status": status.value(i),
                    "width": width.as_ref().and_then(|w| w.is_valid(i).then(|| w.value(i))),
                    "height": height.as_ref().and_then(|h| h.is_valid(i).then(|| h.value(i))),
                    "clip_score": clip.as_ref().and_then(|c| c.is_valid(i).then(|| c.value(i))),
                    "synthetic_clip_scores": syn_sc,
                });
                t.member(&format!("{k}.json"), meta.to_string().as_bytes())?;
                t.samples += 1;
                s.samples += 1;
                if t.samples >= opts.samples_per_tar {
                    let (p, n, bytes) = tar.take().expect("open").finish()?;
                    s.bytes += bytes;
                    s.tars.push((p.file_name().unwrap_or_default().to_string_lossy().to_string(), n));
                }
            }
        }
    }
    if let Some(t) = tar.take() {
        let (p, n, bytes) = t.finish()?;
        s.bytes += bytes;
        s.tars.push((p.file_name().unwrap_or_default().to_string_lossy().to_string(), n));
    }
    let manifest = json!({
        "source": spec,
        "statuses": opts.statuses,
        "samples": s.samples,
        "rows_read": s.rows,
        "shards": s.tars.iter().map(|(n, c)| json!({"url": n, "nsamples": c})).collect::<Vec<_>>(),
    });
    sink::write_atomic(&out.join("manifest.json"), serde_json::to_string_pretty(&manifest).expect("json").as_bytes())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_padded_to_64_bytes() {
        let v = npy_f16(2, 3, &[half::f16::from_f32(1.0); 6]);
        let hlen = u16::from_le_bytes([v[8], v[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(v.len(), 10 + hlen + 12);
        assert_eq!(v[10 + hlen - 1], b'\n');
    }
}
