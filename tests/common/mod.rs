//! Shared set-up for the integration tests: a shapeworld in a temporary directory, served on
//! loopback by the project's own fault-injecting server, and pipeline files pointing at it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, RecordBatch, StringArray, UInt64Array};
use recap::synth::{self, ServeOptions, Server, WorldSpec};

pub struct World {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub server: Server,
    pub urls: PathBuf,
}

/// A small world (64x48 to 160x120 images) served on 127.0.0.1 with the given faults.
pub async fn world(count: u64, corrupt: u64, faults: &str, opts: ServeOptions) -> World {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("world");
    let spec = WorldSpec { count, seed: 5, min_size: (64, 48), max_size: (160, 120), png_fraction: 0.2, corrupt, ..Default::default() };
    let d = dir.clone();
    tokio::task::spawn_blocking(move || synth::generate(&d, &spec)).await.unwrap().unwrap();
    let server = synth::serve(dir.clone(), 0, opts).await.unwrap();
    let urls = synth::write_url_list(&dir, &server.base_url(), &synth::parse_faults(faults).unwrap(), 5).unwrap();
    World { tmp, dir, server, urls }
}

/// A pipeline YAML for the world, with extra lines appended under each section.
pub fn pipeline(w: &World, out: &Path, rows_per_shard: u64, download_extra: &str, image_extra: &str) -> PathBuf {
    let text = format!(
        r#"input:
  path: {urls}
  passthrough: [id, fault]
  rows_per_shard: {rows_per_shard}
download:
  concurrency: 16
  per_host: 16
  timeout: 1s
  retries: 1
  backoff: 20ms
  max_bytes: 1MB
  allow_private_networks: true
{download_extra}
image:
  size: 32
  min_size: 32
{image_extra}
output:
  path: {out}
"#,
        urls = w.urls.display(),
        out = out.display(),
    );
    let path = w.tmp.path().join(format!("pipeline-{}.yaml", out.file_name().unwrap().to_string_lossy()));
    std::fs::write(&path, text).unwrap();
    path
}

/// All rows of all shards in a directory, shard by shard.
pub fn read_all(dir: &Path) -> Vec<(u64, RecordBatch)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let shard: u64 = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            (shard, recap::sink::read_shard(&p).unwrap().0)
        })
        .collect()
}

pub fn strings(b: &RecordBatch, col: &str) -> Vec<Option<String>> {
    let a = b.column_by_name(col).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    (0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_string())).collect()
}

pub fn u64s(b: &RecordBatch, col: &str) -> Vec<u64> {
    let a = b.column_by_name(col).unwrap().as_any().downcast_ref::<UInt64Array>().unwrap();
    a.values().to_vec()
}

/// (key, url, status, sha256) of every row, in shard order: what must not depend on how a run went.
pub fn fingerprint(dir: &Path) -> Vec<(String, Option<String>, String, Option<String>)> {
    let mut out = Vec::new();
    for (_, b) in read_all(dir) {
        let keys = strings(&b, "key");
        let urls = strings(&b, "url");
        let status = strings(&b, "status");
        let sha = strings(&b, "sha256");
        for i in 0..b.num_rows() {
            out.push((keys[i].clone().unwrap(), urls[i].clone(), status[i].clone().unwrap(), sha[i].clone()));
        }
    }
    out
}

pub fn count_status(dir: &Path) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (_, _, s, _) in fingerprint(dir) {
        *m.entry(s).or_default() += 1;
    }
    m
}
