//! `recap dedup`: find duplicate images across all shards of a run and mark them.
//!
//! Only `ok` rows take part. In key order, the first row of each group is kept and the others
//! get status `duplicate` with the kept row's key in the reason:
//! - **exact**: the same SHA-256 of the downloaded bytes;
//! - **near**: perceptual hashes (64-bit phash) within `near_bits` differing bits, found by
//!   multi-index hashing (the hash cut into 4 bands of 16 bits; two hashes within k bits agree
//!   on some band to within k/4 bits, so only rows sharing a probed band value are compared,
//!   never all pairs), grouped transitively;
//! - **semantic** (optional, SemDeDup-style): the teachers' embeddings of the original image
//!   (`view(image_embeddings, 0)`) at or above a cosine threshold, compared within clusters of a
//!   spherical k-means.
//!
//! Memory is bounded by what is read: key, status, sha256 and phash per ok row (and the
//! embedding of the original view in semantic mode), read column by column from the files. Shards
//! with marked rows are rewritten atomically, stats updated; a rerun finds nothing new (the
//! marked rows are no longer `ok`) and writes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{Float16Type, UInt64Type};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::outcome::Status;
use crate::sink::{self, DedupStats};

/// What to look for.
#[derive(Debug, Clone)]
pub struct DedupOptions {
    /// Near duplicates: phash within this many bits (at most 15); None turns it off.
    pub near_bits: Option<u32>,
    /// Semantic duplicates: cosine of the teachers' image embeddings at or above this.
    pub semantic: Option<f32>,
    /// Rows per k-means cluster in semantic mode (clusters = ok rows / this).
    pub cluster_size: usize,
    /// Report only; rewrite nothing.
    pub dry_run: bool,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions { near_bits: Some(4), semantic: None, cluster_size: 1000, dry_run: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Exact,
    Near(u32),
    Semantic(f32),
}

/// One row found to be a duplicate.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub key: String,
    pub kept: String,
    pub kind: Kind,
}

impl Found {
    pub fn reason(&self) -> String {
        match self.kind {
            Kind::Exact => format!("duplicate of {} (exact: same sha256)", self.kept),
            Kind::Near(b) => format!("duplicate of {} (near: phash {b} bits apart)", self.kept),
            Kind::Semantic(c) => format!("duplicate of {} (semantic: cosine {c:.3})", self.kept),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DedupSummary {
    pub files: usize,
    pub rows: u64,
    pub ok_rows: u64,
    pub exact: u64,
    pub near: u64,
    pub semantic: u64,
    pub found: Vec<Found>,
    pub shards_rewritten: Vec<PathBuf>,
    pub seconds_find: f64,
    pub seconds_write: f64,
    pub dry_run: bool,
}

/// An ok row, as dedup keeps it in memory (its key lives in one shared string): 48 bytes.
#[derive(Clone, Copy)]
struct Row {
    key_at: u32,
    key_len: u16,
    file: u32,
    row: u32,
    /// The first 128 bits of the SHA-256 (a collision among 10^9 rows has odds of about 10^-21),
    /// as two words so the row packs without 16-byte alignment.
    sha: [u64; 2],
    has_sha: bool,
    has_phash: bool,
    phash: u64,
}

impl Row {
    fn sha(&self) -> Option<(u64, u64)> {
        self.has_sha.then_some((self.sha[0], self.sha[1]))
    }
    fn phash(&self) -> Option<u64> {
        self.has_phash.then_some(self.phash)
    }
}

fn read_columns(path: &Path, cols: &[&str]) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    sink::read_columns(path, cols, &[], 8192, |c| match c {
        "image_embeddings" => "has no column image_embeddings; --semantic needs reinforced shards (a run with a score stage)".into(),
        c => format!("has no column {c}; dedup needs key, status, reason, sha256 and phash (a shard written by `recap run`)"),
    })
}

fn parse_sha(s: &str) -> Option<[u64; 2]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some([u64::from_be_bytes(out[..8].try_into().expect("8 bytes")), u64::from_be_bytes(out[8..16].try_into().expect("8 bytes"))])
}

/// Union-find whose root is always the smallest index (the first row in key order).
struct Groups {
    parent: Vec<u32>,
}

impl Groups {
    fn new(n: usize) -> Self {
        Groups { parent: (0..n as u32).collect() }
    }
    fn find(&mut self, mut i: u32) -> u32 {
        while self.parent[i as usize] != i {
            let p = self.parent[i as usize];
            self.parent[i as usize] = self.parent[p as usize];
            i = p;
        }
        i
    }
    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi as usize] = lo;
        }
    }
}

/// All 16-bit values within `r` bits of `v`.
fn probes(v: u16, r: u32) -> Vec<u16> {
    let mut out = vec![v];
    if r >= 1 {
        for i in 0..16 {
            out.push(v ^ (1 << i));
        }
    }
    if r >= 2 {
        for i in 0..16 {
            for j in i + 1..16 {
                out.push(v ^ (1 << i) ^ (1 << j));
            }
        }
    }
    if r >= 3 {
        for i in 0..16 {
            for j in i + 1..16 {
                for k in j + 1..16 {
                    out.push(v ^ (1 << i) ^ (1 << j) ^ (1 << k));
                }
            }
        }
    }
    out
}

/// Pairs (i, j), i < j, of hashes within `k` bits, by multi-index hashing over 4 bands of 16
/// bits. `hashes[i]` is (row index, hash). Each band is a counting sort of (hash, position) by
/// the band's value, so a probe is one slice, read in order.
pub fn near_pairs(hashes: &[(u32, u64)], k: u32) -> Vec<(u32, u32, u32)> {
    assert!(k <= 15, "near_bits is at most 15");
    let r = k / 4;
    let bands: Vec<(Vec<u32>, Vec<(u64, u32)>)> = (0..4)
        .into_par_iter()
        .map(|b| {
            let band = |h: u64| (h >> (16 * b)) as u16 as usize;
            let mut starts = vec![0u32; 65537];
            for &(_, h) in hashes {
                starts[band(h) + 1] += 1;
            }
            for v in 0..65536 {
                starts[v + 1] += starts[v];
            }
            let mut fill = starts.clone();
            let mut entries = vec![(0u64, 0u32); hashes.len()];
            for (p, &(_, h)) in hashes.iter().enumerate() {
                let slot = &mut fill[band(h)];
                entries[*slot as usize] = (h, p as u32);
                *slot += 1;
            }
            (starts, entries)
        })
        .collect();
    // Every 16-bit value within r bits of v is v ^ one of these.
    let masks = probes(0, r);
    let mut pairs: Vec<(u32, u32, u32)> = hashes
        .par_iter()
        .enumerate()
        .flat_map_iter(|(p, &(_, h))| {
            let mut out = Vec::new();
            for (b, (starts, entries)) in bands.iter().enumerate() {
                let v = (h >> (16 * b)) as u16;
                for &m in &masks {
                    let probe = v ^ m;
                    let (lo, hi) = (starts[probe as usize] as usize, starts[probe as usize + 1] as usize);
                    for &(other, q) in &entries[lo..hi] {
                        if (q as usize) > p {
                            let d = (h ^ other).count_ones();
                            if d <= k {
                                out.push((p as u32, q, d));
                            }
                        }
                    }
                }
            }
            out
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    pairs
}

/// Spherical k-means (seeded, a few rounds), then pairs within each cluster at or above `t`.
fn semantic_pairs(emb: &[f32], dim: usize, t: f32, cluster_size: usize) -> Vec<(u32, u32, f32)> {
    let n = emb.len() / dim;
    if n < 2 {
        return Vec::new();
    }
    let k = n.div_ceil(cluster_size.max(2)).max(1);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    // Evenly spaced rows as the first centroids (deterministic).
    let mut cent: Vec<f32> = (0..k).flat_map(|c| emb[(c * n / k) * dim..(c * n / k + 1) * dim].to_vec()).collect();
    let mut assign = vec![0usize; n];
    for _ in 0..5 {
        assign = (0..n)
            .into_par_iter()
            .map(|i| {
                let v = &emb[i * dim..(i + 1) * dim];
                (0..k).map(|c| (c, dot(v, &cent[c * dim..(c + 1) * dim]))).fold((0, f32::MIN), |a, b| if b.1 > a.1 { b } else { a }).0
            })
            .collect();
        let mut sums = vec![0f32; k * dim];
        for (i, &c) in assign.iter().enumerate() {
            for (s, x) in sums[c * dim..(c + 1) * dim].iter_mut().zip(&emb[i * dim..(i + 1) * dim]) {
                *s += x;
            }
        }
        for c in 0..k {
            let s = &mut sums[c * dim..(c + 1) * dim];
            let norm = s.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                s.iter_mut().for_each(|x| *x /= norm);
                cent[c * dim..(c + 1) * dim].copy_from_slice(s);
            }
        }
    }
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); k];
    for (i, &c) in assign.iter().enumerate() {
        members[c].push(i as u32);
    }
    members
        .par_iter()
        .flat_map_iter(|m| {
            let mut out = Vec::new();
            for (a, &i) in m.iter().enumerate() {
                for &j in &m[a + 1..] {
                    let c = dot(&emb[i as usize * dim..(i as usize + 1) * dim], &emb[j as usize * dim..(j as usize + 1) * dim]);
                    if c >= t {
                        out.push((i.min(j), i.max(j), c));
                    }
                }
            }
            out
        })
        .collect()
}

/// Find duplicates across the shards `spec` names and, unless `dry_run`, mark them.
pub fn dedup(spec: &str, opts: &DedupOptions) -> Result<DedupSummary> {
    if let Some(k) = opts.near_bits {
        if k > 15 {
            return Err(Error::Usage(format!("--near-bits {k}: at most 15 (of 64 bits; more finds unrelated images)")));
        }
    }
    if let Some(t) = opts.semantic {
        if !(-1.0..=1.0).contains(&t) {
            return Err(Error::Usage(format!("--semantic {t}: a cosine threshold in [-1, 1], e.g. 0.95")));
        }
    }
    let t0 = std::time::Instant::now();
    if crate::storage::is_url(spec) {
        return Err(Error::Usage(format!(
            "{spec}: recap dedup rewrites shards in place, which an object store cannot do atomically; run it on a local copy of the shards"
        )));
    }
    let files = sink::list_shards(spec)?;
    let mut s = DedupSummary { files: files.len(), dry_run: opts.dry_run, ..Default::default() };
    let mut rows: Vec<Row> = Vec::new();
    let mut keys = String::new();
    let mut emb: Vec<f32> = Vec::new();
    let mut dim = 0usize;
    let mut has_emb: Vec<bool> = Vec::new();
    let mut cols = vec!["key", "status", "sha256", "phash"];
    if opts.semantic.is_some() {
        cols.push("image_embeddings");
    }
    if !opts.dry_run {
        // Marking rewrites status and reason: refuse before any work a file that lacks one.
        cols.push("reason");
    }
    for (fi, f) in files.iter().enumerate() {
        let mut row_in_file = 0u32;
        for b in read_columns(f, &cols)? {
            let b = b?;
            let key = b.column_by_name("key").expect("projected").as_string::<i32>();
            let status = b.column_by_name("status").expect("projected").as_string::<i32>();
            let sha = b.column_by_name("sha256").expect("projected").as_string::<i32>();
            let phash = b.column_by_name("phash").expect("projected").as_primitive::<UInt64Type>();
            let views = b.column_by_name("image_embeddings").map(|c| c.as_list::<i32>().clone());
            s.rows += b.num_rows() as u64;
            for i in 0..b.num_rows() {
                let r = row_in_file;
                row_in_file += 1;
                if status.value(i) != Status::Ok.as_str() {
                    continue;
                }
                let k = key.value(i);
                if k.len() > u16::MAX as usize {
                    return Err(Error::input(f, format!("row {r}: a key of {} bytes; keys are short ids (shard + row)", k.len())));
                }
                let key_at = keys.len() as u32;
                keys.push_str(k);
                let sha = sha.is_valid(i).then(|| parse_sha(sha.value(i))).flatten();
                rows.push(Row {
                    key_at,
                    key_len: k.len() as u16,
                    file: fi as u32,
                    row: r,
                    sha: sha.unwrap_or_default(),
                    has_sha: sha.is_some(),
                    has_phash: phash.is_valid(i),
                    phash: if phash.is_valid(i) { phash.value(i) } else { 0 },
                });
                if let Some(v) = &views {
                    let first = (v.is_valid(i) && v.value_length(i) > 0).then(|| v.value(i)).map(|m| m.as_fixed_size_list().value(0));
                    match first {
                        Some(e) => {
                            let e = e.as_primitive::<Float16Type>();
                            dim = e.len();
                            let norm = e.values().iter().map(|x| x.to_f32().powi(2)).sum::<f32>().sqrt().max(1e-12);
                            emb.extend(e.values().iter().map(|x| x.to_f32() / norm));
                            has_emb.push(true);
                        }
                        None => {
                            emb.extend(std::iter::repeat_n(0.0, dim));
                            has_emb.push(false);
                        }
                    }
                }
            }
        }
    }
    if opts.semantic.is_some() && dim == 0 && !rows.is_empty() {
        return Err(Error::input(spec, "--semantic needs image_embeddings (reinforced shards from a run with a score stage); these rows have none"));
    }
    if keys.len() > u32::MAX as usize {
        return Err(Error::Usage("more than 4 GB of keys: deduplicate fewer shards at a time".into()));
    }
    let key_of = |r: &Row| &keys[r.key_at as usize..r.key_at as usize + r.key_len as usize];
    // Key order decides which row of a group is kept. In place, unless the embeddings must follow.
    if opts.semantic.is_some() {
        let mut order: Vec<u32> = (0..rows.len() as u32).collect();
        order.sort_by(|&a, &b| key_of(&rows[a as usize]).cmp(key_of(&rows[b as usize])));
        rows = order.iter().map(|&i| rows[i as usize]).collect();
        let mut e2 = Vec::with_capacity(emb.len());
        let mut h2 = Vec::with_capacity(has_emb.len());
        for &i in &order {
            let i = i as usize;
            e2.extend_from_slice(&emb[i * dim..(i + 1) * dim]);
            h2.push(has_emb[i]);
        }
        emb = e2;
        has_emb = h2;
    } else {
        rows.sort_by(|a, b| key_of(a).cmp(key_of(b)));
    }
    s.ok_rows = rows.len() as u64;
    let mut dup: Vec<Option<(u32, Kind)>> = vec![None; rows.len()];
    // Exact.
    let mut first: HashMap<(u64, u64), u32> = HashMap::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        if let Some(h) = r.sha() {
            match first.get(&h) {
                Some(&k) => dup[i] = Some((k, Kind::Exact)),
                None => {
                    first.insert(h, i as u32);
                }
            }
        }
    }
    drop(first);
    // Near, among the rows left.
    if let Some(k) = opts.near_bits {
        let hashes: Vec<(u32, u64)> =
            rows.iter().enumerate().filter(|(i, _)| dup[*i].is_none()).filter_map(|(i, r)| r.phash().map(|h| (i as u32, h))).collect();
        let pairs = near_pairs(&hashes, k);
        let mut g = Groups::new(rows.len());
        for &(p, q, _) in &pairs {
            g.union(hashes[p as usize].0, hashes[q as usize].0);
        }
        for &(i, h) in &hashes {
            let root = g.find(i);
            if root != i {
                let bits = (h ^ rows[root as usize].phash().unwrap_or(h)).count_ones();
                dup[i as usize] = Some((root, Kind::Near(bits)));
            }
        }
    }
    // Semantic, among the rows left.
    if let Some(t) = opts.semantic {
        let idx: Vec<u32> = (0..rows.len() as u32).filter(|&i| dup[i as usize].is_none() && has_emb[i as usize]).collect();
        let sub: Vec<f32> = idx.iter().flat_map(|&i| emb[i as usize * dim..(i as usize + 1) * dim].iter().copied()).collect();
        let pairs = semantic_pairs(&sub, dim, t, opts.cluster_size);
        let mut g = Groups::new(rows.len());
        for &(a, b, _) in &pairs {
            g.union(idx[a as usize], idx[b as usize]);
        }
        for &i in &idx {
            let root = g.find(i);
            if root != i {
                let (a, b) = (&emb[i as usize * dim..(i as usize + 1) * dim], &emb[root as usize * dim..(root as usize + 1) * dim]);
                let c = a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
                dup[i as usize] = Some((root, Kind::Semantic(c)));
            }
        }
    }
    // What to change, per file.
    let mut per_file: HashMap<u32, Vec<(u32, Found)>> = HashMap::new();
    for (i, d) in dup.iter().enumerate() {
        if let Some((kept, kind)) = d {
            let f = Found { key: key_of(&rows[i]).to_string(), kept: key_of(&rows[*kept as usize]).to_string(), kind: *kind };
            match kind {
                Kind::Exact => s.exact += 1,
                Kind::Near(_) => s.near += 1,
                Kind::Semantic(_) => s.semantic += 1,
            }
            per_file.entry(rows[i].file).or_default().push((rows[i].row, f.clone()));
            s.found.push(f);
        }
    }
    s.seconds_find = t0.elapsed().as_secs_f64();
    if opts.dry_run {
        return Ok(s);
    }
    let t1 = std::time::Instant::now();
    let mut file_ids: Vec<u32> = per_file.keys().copied().collect();
    file_ids.sort();
    for fi in file_ids {
        let path = &files[fi as usize];
        let marks = &per_file[&fi];
        let (batch, _) = sink::read_shard(path)?;
        let batch = mark(&batch, marks).map_err(|e| Error::input(path, e))?;
        let mut st = DedupStats::default();
        for (_, f) in marks {
            match f.kind {
                Kind::Exact => st.exact += 1,
                Kind::Near(_) => st.near += 1,
                Kind::Semantic(_) => st.semantic += 1,
            }
        }
        sink::rewrite_shard(path, &batch, |stats| {
            let n = marks.len() as u64;
            if let Some(ok) = stats.status.get_mut("ok") {
                *ok = ok.saturating_sub(n);
            }
            stats.status.retain(|_, v| *v > 0);
            *stats.status.entry("duplicate".into()).or_default() += n;
            for (name, c) in [("exact", st.exact), ("near", st.near), ("semantic", st.semantic)] {
                if c > 0 {
                    *stats.reasons.entry(format!("duplicate: {name}")).or_default() += c;
                }
            }
            let d = stats.dedup.get_or_insert_with(DedupStats::default);
            d.exact += st.exact;
            d.near += st.near;
            d.semantic += st.semantic;
        })?;
        s.shards_rewritten.push(path.clone());
    }
    s.seconds_write = t1.elapsed().as_secs_f64();
    Ok(s)
}

/// The batch with the marked rows' status and reason replaced.
fn mark(batch: &RecordBatch, marks: &[(u32, Found)]) -> std::result::Result<RecordBatch, String> {
    let status = batch.column_by_name("status").ok_or("no status column")?.as_string::<i32>();
    let reason = batch.column_by_name("reason").ok_or("no reason column")?.as_string::<i32>();
    let by_row: HashMap<u32, &Found> = marks.iter().map(|(r, f)| (*r, f)).collect();
    let mut new_status = Vec::with_capacity(batch.num_rows());
    let mut new_reason = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        match by_row.get(&(i as u32)) {
            Some(f) => {
                if status.value(i) != "ok" {
                    return Err(format!("row {i} changed since it was read (status {})", status.value(i)));
                }
                new_status.push(Some(Status::Duplicate.as_str().to_string()));
                new_reason.push(Some(f.reason()));
            }
            None => {
                new_status.push(Some(status.value(i).to_string()));
                new_reason.push(reason.is_valid(i).then(|| reason.value(i).to_string()));
            }
        }
    }
    let schema = batch.schema();
    let cols: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| match f.name().as_str() {
            "status" => Arc::new(StringArray::from(new_status.clone())) as ArrayRef,
            "reason" => Arc::new(StringArray::from(new_reason.clone())) as ArrayRef,
            _ => c.clone(),
        })
        .collect();
    RecordBatch::try_new(schema, cols).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn multi_index_hashing_finds_every_pair_all_pairs_would() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut hashes: Vec<(u32, u64)> = (0..3000).map(|i| (i, rng.random::<u64>())).collect();
        // Plant near copies at 0..=9 bits.
        for i in 0..200u32 {
            let (_, h) = hashes[i as usize];
            let mut c = h;
            for _ in 0..(i % 10) {
                c ^= 1 << rng.random_range(0..64);
            }
            hashes.push((3000 + i, c));
        }
        for k in [0, 3, 4, 7, 9] {
            let got: Vec<(u32, u32)> = near_pairs(&hashes, k).into_iter().map(|(a, b, _)| (a, b)).collect();
            let mut want = Vec::new();
            for a in 0..hashes.len() {
                for b in a + 1..hashes.len() {
                    if (hashes[a].1 ^ hashes[b].1).count_ones() <= k {
                        want.push((a as u32, b as u32));
                    }
                }
            }
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn groups_keep_the_first_row() {
        let mut g = Groups::new(5);
        g.union(4, 2);
        g.union(2, 3);
        g.union(1, 3);
        assert_eq!((g.find(4), g.find(3), g.find(2), g.find(0)), (1, 1, 1, 0));
    }

    #[test]
    fn semantic_pairs_within_clusters() {
        let dim = 4;
        let v = |a: [f32; 4]| {
            let n = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            a.map(|x| x / n)
        };
        let emb: Vec<f32> = [v([1.0, 0.0, 0.0, 0.0]), v([0.99, 0.05, 0.0, 0.0]), v([0.0, 1.0, 0.0, 0.0]), v([0.0, 0.0, 1.0, 0.0])].concat();
        let p = semantic_pairs(&emb, dim, 0.95, 2);
        assert_eq!(p.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(), vec![(0, 1)]);
    }
}
