//! `recap report`: one self-contained HTML page about a run (no network at view time).
//!
//! Two passes over the shards, reading only what each needs. The first reads the small columns
//! (no images): counts per status, failures by reason and by host, histograms, and picks which
//! rows to show (a seeded reservoir sample of ok rows, the worst-aligned ok rows, a sample of
//! filtered rows and of duplicates). The second reads the images of only those rows (and of the
//! rows the duplicates kept) and shrinks them to thumbnails. The page stays small and fast
//! however large the run: it samples, it does not dump.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, UInt32Type};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::sink;

#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Ok rows shown in the sample tab.
    pub sample: usize,
    /// Worst-aligned ok rows shown.
    pub worst: usize,
    /// Filtered rows shown.
    pub filtered: usize,
    /// Duplicate pairs shown.
    pub duplicates: usize,
    /// Longer side of the thumbnails, in pixels.
    pub thumb: u32,
    pub seed: u64,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions { sample: 240, worst: 60, filtered: 120, duplicates: 40, thumb: 128, seed: 0 }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ReportSummary {
    pub rows: u64,
    pub files: usize,
    pub cards: usize,
    pub bytes: u64,
    pub reinforced: bool,
}

const FETCH_FAILURES: [&str; 8] = ["invalid_url", "blocked", "download_failed", "timeout", "http_error", "too_many_redirects", "too_large", "opted_out"];
const IMAGE_FAILURES: [&str; 5] = ["decode_failed", "too_many_pixels", "too_small", "bad_aspect", "encode_failed"];

/// A fixed-range histogram, trimmed to its non-empty span when written.
struct Hist {
    lo: f64,
    width: f64,
    bins: Vec<u64>,
    under: u64,
    over: u64,
}

impl Hist {
    fn new(lo: f64, hi: f64, n: usize) -> Self {
        Hist { lo, width: (hi - lo) / n as f64, bins: vec![0; n], under: 0, over: 0 }
    }
    fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let b = ((v - self.lo) / self.width).floor();
        if b < 0.0 {
            self.under += 1;
        } else if b as usize >= self.bins.len() {
            self.over += 1;
        } else {
            self.bins[b as usize] += 1;
        }
    }
    fn to_json(&self) -> Value {
        let first = self.bins.iter().position(|&c| c > 0);
        let last = self.bins.iter().rposition(|&c| c > 0);
        match (first, last) {
            (Some(a), Some(b)) => json!({
                "lo": self.lo + a as f64 * self.width, "width": self.width, "bins": &self.bins[a..=b],
                "under": self.under, "over": self.over, "n": self.bins.iter().sum::<u64>() + self.under + self.over,
            }),
            _ => json!({"lo": self.lo, "width": self.width, "bins": [], "under": self.under, "over": self.over, "n": self.under + self.over}),
        }
    }
}

/// Numbers in a reason replaced by `#`, so reasons group by kind.
fn reason_kind(r: &str) -> String {
    let mut out = String::with_capacity(r.len());
    let mut in_num = false;
    let mut prev: Option<char> = None;
    let chars: Vec<char> = r.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let starts = !prev.is_some_and(|p| p.is_alphanumeric() || p == '_')
            && (c.is_ascii_digit() || (c == '-' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())));
        if in_num && (c.is_ascii_digit() || c == '.' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())) {
        } else if starts {
            out.push('#');
            in_num = true;
        } else {
            in_num = false;
            out.push(c);
        }
        prev = Some(c);
    }
    out
}

fn host_of(url: &str) -> String {
    url::Url::parse(url).ok().and_then(|u| u.host_str().map(|h| match u.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    })).unwrap_or_else(|| "(no host)".into())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        s.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    s
}

/// A JPEG thumbnail as a data URI; None when the stored image does not decode.
fn thumbnail(bytes: &[u8], side: u32) -> Option<String> {
    let img = image::load_from_memory(bytes).ok()?.to_rgb8();
    let (w, h) = img.dimensions();
    let scale = (side as f32 / w.max(h) as f32).min(1.0);
    let (tw, th) = (((w as f32 * scale).round() as u32).max(1), ((h as f32 * scale).round() as u32).max(1));
    let small = if (tw, th) == (w, h) { img } else { image::imageops::thumbnail(&img, tw, th) };
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 80).encode(small.as_raw(), tw as u16, th as u16, jpeg_encoder::ColorType::Rgb).ok()?;
    Some(format!("data:image/jpeg;base64,{}", base64(&out)))
}

/// Batches of `key`, `status` and whichever of `cols` the file has.
fn read(path: &Path, cols: &[&str]) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    sink::read_columns(path, &["key", "status"], cols, 1024, |c| format!("has no column {c}; expected a shard written by `recap run`"))
}

/// A reservoir of at most `cap` keys, seeded.
struct Reservoir {
    cap: usize,
    seen: u64,
    items: Vec<String>,
}

impl Reservoir {
    fn new(cap: usize) -> Self {
        Reservoir { cap, seen: 0, items: Vec::new() }
    }
    fn offer(&mut self, key: &str, rng: &mut impl Rng) {
        self.seen += 1;
        if self.items.len() < self.cap {
            self.items.push(key.to_string());
        } else if self.cap > 0 {
            let j = rng.random_range(0..self.seen);
            if (j as usize) < self.cap {
                self.items[j as usize] = key.to_string();
            }
        }
    }
}

/// Ordered by score for a max-heap that keeps the lowest scores.
#[derive(PartialEq)]
struct Scored(f32, String);
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scored {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then_with(|| self.1.cmp(&o.1))
    }
}

fn str_col<'a>(b: &'a RecordBatch, name: &str) -> Option<&'a arrow::array::StringArray> {
    b.column_by_name(name).and_then(|c| c.as_string_opt::<i32>())
}

/// Write the report for the shards `spec` names to `out`.
pub fn report(spec: &str, out: &Path, opts: &ReportOptions) -> Result<ReportSummary> {
    let files = sink::list_shards(spec)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    // The file-level facts from the first shard's footer.
    let b0 = sink::open_shard(&files[0])?;
    for c in ["key", "status"] {
        if b0.schema().field_with_name(c).is_err() {
            return Err(Error::input(&files[0], format!("has no column {c}; expected a shard written by `recap run`")));
        }
    }
    let kv = sink::kv_metadata(&b0);
    let reinforced = b0.schema().field_with_name("clip_score").is_ok();
    let synthetic = b0.schema().field_with_name("synthetic_captions").is_ok();
    drop(b0);

    // Pass 1: counts, histograms, choices.
    let mut status: BTreeMap<String, u64> = BTreeMap::new();
    let mut reasons: HashMap<(String, String), (u64, String)> = HashMap::new();
    let mut hosts: HashMap<String, (u64, u64)> = HashMap::new();
    let mut h_alt = Hist::new(-1.0, 1.0, 100);
    let mut h_syn = Hist::new(-1.0, 1.0, 100);
    let mut h_w = Hist::new(0.0, 4096.0, 64);
    let mut h_h = Hist::new(0.0, 4096.0, 64);
    let mut h_alt_words = Hist::new(0.0, 80.0, 80);
    let mut h_syn_words = Hist::new(0.0, 80.0, 80);
    let mut ok_sample = Reservoir::new(opts.sample);
    let mut filtered_sample = Reservoir::new(opts.filtered);
    let mut dup_sample = Reservoir::new(opts.duplicates);
    let mut worst: BinaryHeap<Scored> = BinaryHeap::new();
    let mut rows = 0u64;
    let mut bytes_files = 0u64;
    for f in &files {
        bytes_files += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        for b in read(f, &["key", "url", "caption", "status", "reason", "original_width", "original_height", "clip_score", "synthetic_clip_scores", "synthetic_captions"])? {
            let b = b?;
            let key = str_col(&b, "key").expect("checked");
            let st = str_col(&b, "status").expect("checked");
            let url = str_col(&b, "url");
            let cap = str_col(&b, "caption");
            let reason = str_col(&b, "reason");
            let ow = b.column_by_name("original_width").map(|c| c.as_primitive::<UInt32Type>().clone());
            let oh = b.column_by_name("original_height").map(|c| c.as_primitive::<UInt32Type>().clone());
            let clip = b.column_by_name("clip_score").map(|c| c.as_primitive::<Float32Type>().clone());
            let syn = b.column_by_name("synthetic_clip_scores").map(|c| c.as_list::<i32>().clone());
            let syn_caps = b.column_by_name("synthetic_captions").map(|c| c.as_list::<i32>().clone());
            for i in 0..b.num_rows() {
                rows += 1;
                let s = st.value(i);
                *status.entry(s.to_string()).or_default() += 1;
                let failed = s != "ok" && s != "filtered" && s != "duplicate";
                if let Some(u) = url.filter(|u| u.is_valid(i)) {
                    let e = hosts.entry(host_of(u.value(i))).or_default();
                    e.1 += 1;
                    if failed {
                        e.0 += 1;
                    }
                }
                if s != "ok" {
                    let r = reason.filter(|r| r.is_valid(i)).map(|r| r.value(i)).unwrap_or("");
                    let e = reasons.entry((s.to_string(), reason_kind(r))).or_insert((0, r.to_string()));
                    e.0 += 1;
                }
                if let (Some(w), Some(h)) = (&ow, &oh) {
                    if w.is_valid(i) && h.is_valid(i) {
                        h_w.add(w.value(i) as f64);
                        h_h.add(h.value(i) as f64);
                    }
                }
                if let Some(c) = cap.filter(|c| c.is_valid(i)) {
                    h_alt_words.add(c.value(i).split_whitespace().count() as f64);
                }
                if let Some(l) = syn_caps.as_ref().filter(|l| l.is_valid(i)) {
                    let v = l.value(i);
                    let v = v.as_string::<i32>();
                    for k in 0..v.len() {
                        h_syn_words.add(v.value(k).split_whitespace().count() as f64);
                    }
                }
                let score = clip.as_ref().and_then(|c| c.is_valid(i).then(|| c.value(i)));
                if let Some(x) = score {
                    h_alt.add(x as f64);
                }
                if let Some(l) = syn.as_ref().filter(|l| l.is_valid(i)) {
                    let v = l.value(i);
                    if let Some(best) = v.as_primitive::<Float32Type>().values().iter().copied().reduce(f32::max) {
                        h_syn.add(best as f64);
                    }
                }
                let k = key.value(i);
                match s {
                    "ok" => {
                        ok_sample.offer(k, &mut rng);
                        if let Some(x) = score {
                            worst.push(Scored(x, k.to_string()));
                            if worst.len() > opts.worst {
                                worst.pop();
                            }
                        }
                    }
                    "filtered" => filtered_sample.offer(k, &mut rng),
                    "duplicate" => dup_sample.offer(k, &mut rng),
                    _ => {}
                }
            }
        }
    }

    // Pass 2: the chosen rows, with thumbnails; duplicates' kept rows too.
    let mut tabs: HashMap<String, Vec<&'static str>> = HashMap::new();
    for k in &ok_sample.items {
        tabs.entry(k.clone()).or_default().push("sample");
    }
    for s in worst.iter() {
        tabs.entry(s.1.clone()).or_default().push("worst");
    }
    for k in &filtered_sample.items {
        tabs.entry(k.clone()).or_default().push("filtered");
    }
    for k in &dup_sample.items {
        tabs.entry(k.clone()).or_default().push("duplicates");
    }
    let mut cards: BTreeMap<String, Value> = BTreeMap::new();
    let mut kept_wanted: HashSet<String> = HashSet::new();
    let mut kept_cards: BTreeMap<String, Value> = BTreeMap::new();
    let cols = ["key", "url", "caption", "status", "reason", "image", "width", "height", "clip_score", "synthetic_clip_scores", "synthetic_captions"];
    for pass in 0..2 {
        if pass == 1 && kept_wanted.is_empty() {
            break;
        }
        for f in &files {
            for b in read(f, &cols)? {
                let b = b?;
                let key = str_col(&b, "key").expect("checked");
                for i in 0..b.num_rows() {
                    let k = key.value(i);
                    let chosen = if pass == 0 { tabs.contains_key(k) } else { kept_wanted.contains(k) };
                    if !chosen {
                        continue;
                    }
                    let card = card(&b, i, opts.thumb);
                    if pass == 0 {
                        if let Some(kept) = card["reason"].as_str().and_then(|r| r.strip_prefix("duplicate of ")).and_then(|r| r.split_whitespace().next()) {
                            kept_wanted.insert(kept.to_string());
                        }
                        let mut c = card;
                        c["tabs"] = json!(tabs[k]);
                        cards.insert(k.to_string(), c);
                    } else {
                        kept_cards.insert(k.to_string(), card);
                    }
                }
            }
        }
    }
    let pairs: Vec<Value> = cards
        .values()
        .filter(|c| c["status"] == "duplicate")
        .map(|c| {
            let kept = c["reason"].as_str().and_then(|r| r.strip_prefix("duplicate of ")).and_then(|r| r.split_whitespace().next()).unwrap_or("");
            json!({"dup": c["key"], "kept": kept, "kept_card": kept_cards.get(kept).cloned().unwrap_or(Value::Null)})
        })
        .collect();

    let count = |names: &[&str]| names.iter().map(|n| status.get(*n).copied().unwrap_or(0)).sum::<u64>();
    let fetched = rows - count(&FETCH_FAILURES);
    let usable = fetched - count(&IMAGE_FAILURES);
    let passed = usable - count(&["filtered"]);
    let unique = passed - count(&["duplicate"]);
    let mut reason_rows: Vec<(String, String, u64, String)> = reasons.into_iter().map(|((s, k), (n, ex))| (s, k, n, ex)).collect();
    reason_rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    reason_rows.truncate(40);
    let mut host_rows: Vec<(String, u64, u64)> = hosts.into_iter().map(|(h, (f, t))| (h, f, t)).collect();
    host_rows.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    host_rows.truncate(25);
    let teachers: Value = kv.get("recap.teachers").and_then(|t| serde_json::from_str(t).ok()).unwrap_or(Value::Null);
    let data = json!({
        "source": spec,
        "files": files.len(),
        "file_bytes": bytes_files,
        "rows": rows,
        "reinforced": reinforced,
        "synthetic": synthetic,
        "teachers": teachers,
        "captioner": kv.get("recap.captioner"),
        "recap_version": kv.get("recap.version"),
        "config_hash": kv.get("recap.config_hash"),
        "status": status,
        "funnel": [["input rows", rows], ["downloaded", fetched], ["decoded, size and aspect ok", usable], ["passed the filters", passed], ["not a duplicate (ok)", unique]],
        "reasons": reason_rows.iter().map(|r| json!({"status": r.0, "kind": r.1, "rows": r.2, "example": r.3})).collect::<Vec<_>>(),
        "hosts": host_rows.iter().map(|h| json!({"host": h.0, "failed": h.1, "rows": h.2})).collect::<Vec<_>>(),
        "hist": {
            "alt_score": h_alt.to_json(), "best_synthetic_score": h_syn.to_json(),
            "original_width": h_w.to_json(), "original_height": h_h.to_json(),
            "alt_words": h_alt_words.to_json(), "synthetic_words": h_syn_words.to_json(),
        },
        "sampled": {"ok": ok_sample.seen, "filtered": filtered_sample.seen, "duplicate": dup_sample.seen},
        "cards": cards.values().collect::<Vec<_>>(),
        "pairs": pairs,
    });
    // `</` cannot end the script element early.
    let json_text = data.to_string().replace("</", "<\\/");
    let html = TEMPLATE.replace("/*RECAP_DATA*/null", &json_text);
    sink::write_atomic(out, html.as_bytes())?;
    Ok(ReportSummary { rows, files: files.len(), cards: cards.len(), bytes: html.len() as u64, reinforced })
}

/// One row as the page shows it.
fn card(b: &RecordBatch, i: usize, thumb: u32) -> Value {
    let s = |n: &str| str_col(b, n).and_then(|c| c.is_valid(i).then(|| c.value(i).to_string()));
    let img = b.column_by_name("image").map(|c| c.as_struct().clone()).and_then(|st| {
        let bytes = st.column(0).as_binary::<i32>();
        (st.is_valid(i) && bytes.is_valid(i)).then(|| thumbnail(bytes.value(i), thumb)).flatten()
    });
    let u32c = |n: &str| b.column_by_name(n).map(|c| c.as_primitive::<UInt32Type>().clone()).and_then(|c| c.is_valid(i).then(|| c.value(i)));
    let clip = b.column_by_name("clip_score").map(|c| c.as_primitive::<Float32Type>().clone()).and_then(|c| c.is_valid(i).then(|| c.value(i)));
    let syn: Vec<String> = b
        .column_by_name("synthetic_captions")
        .map(|c| c.as_list::<i32>().clone())
        .filter(|l| l.is_valid(i))
        .map(|l| {
            let v = l.value(i);
            let v = v.as_string::<i32>();
            (0..v.len()).map(|k| v.value(k).to_string()).collect()
        })
        .unwrap_or_default();
    let syn_scores: Vec<f32> = b
        .column_by_name("synthetic_clip_scores")
        .map(|c| c.as_list::<i32>().clone())
        .filter(|l| l.is_valid(i))
        .map(|l| l.value(i).as_primitive::<Float32Type>().values().to_vec())
        .unwrap_or_default();
    json!({
        "key": s("key"), "url": s("url"), "alt": s("caption"), "status": s("status"), "reason": s("reason"),
        "img": img, "w": u32c("width"), "h": u32c("height"), "alt_score": clip,
        "syn": syn, "syn_scores": syn_scores,
    })
}

const TEMPLATE: &str = include_str!("report.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_group_by_kind_and_base64_is_standard() {
        assert_eq!(reason_kind("alt-text CLIP score -0.071 < filter.min_alt_score 0.2"), "alt-text CLIP score # < filter.min_alt_score #");
        assert_eq!(reason_kind("HTTP 404 Not Found"), "HTTP # Not Found");
        assert_eq!(reason_kind("duplicate of 000000005 (exact: same sha256)"), "duplicate of # (exact: same sha256)");
        assert_eq!(base64(b"recap!"), "cmVjYXAh");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(host_of("http://127.0.0.1:8000/img/1.jpg"), "127.0.0.1:8000");
    }
}
