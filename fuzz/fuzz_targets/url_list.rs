//! Any bytes as a URL list file (Parquet, CSV, TSV, JSON Lines, gzipped text; the first byte
//! picks the kind): opened, counted and cut into shards, every row read; errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

const KINDS: [&str; 5] = ["parquet", "csv", "tsv", "jsonl", "csv.gz"];

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let ext = KINDS[kind as usize % KINDS.len()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("list.{ext}"));
    std::fs::write(&path, body).unwrap();
    let cfg = recap::config::InputConfig {
        path: path.display().to_string(),
        format: None,
        url_column: "url".into(),
        caption_column: Some("caption".into()),
        passthrough: vec![],
        rows_per_shard: 7,
        storage: Default::default(),
    };
    let Ok(plan) = recap::source::InputPlan::open(&cfg) else { return };
    let _ = plan.count_rows();
    for shard in plan.shards() {
        if shard.is_err() {
            break;
        }
    }
});
