//! `recap dedup` on a copy of the committed shapeworld run (tests/data/shards: 10 planted
//! duplicates, alternately exact reposts and near copies, recorded in its `duplicate_of` column).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use recap::dedup::{dedup, DedupOptions, Kind};

fn copy_shards() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    std::fs::create_dir(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/shards");
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    // As a run leaves them: with completion markers.
    for s in ["00000", "00001"] {
        std::fs::write(dir.join(format!("{s}.done")), format!("{{\"rows\":20,\"config_hash\":\"x{s}\"}}")).unwrap();
    }
    (tmp, dir)
}

fn all_rows(dir: &Path) -> RecordBatch {
    let mut batches = Vec::new();
    for s in ["00000", "00001"] {
        batches.push(recap::sink::read_shard(&dir.join(format!("{s}.parquet"))).unwrap().0);
    }
    let schema = batches[0].schema();
    let batches: Vec<RecordBatch> = batches.into_iter().map(|b| b.with_schema(schema.clone()).unwrap_or_else(|e| panic!("{e}"))).collect();
    arrow::compute::concat_batches(&schema, &batches).unwrap()
}

/// (key, id, duplicate_of, status, reason) of every row.
fn table(b: &RecordBatch) -> Vec<(String, u64, Option<u64>, String, Option<String>)> {
    let key = b.column_by_name("key").unwrap().as_string::<i32>();
    let id = b.column_by_name("id").unwrap().as_primitive::<UInt64Type>();
    let dof = b.column_by_name("duplicate_of").unwrap().as_primitive::<UInt64Type>();
    let st = b.column_by_name("status").unwrap().as_string::<i32>();
    let re = b.column_by_name("reason").unwrap().as_string::<i32>();
    (0..b.num_rows())
        .map(|i| {
            (key.value(i).to_string(), id.value(i), dof.is_valid(i).then(|| dof.value(i)), st.value(i).to_string(), re.is_valid(i).then(|| re.value(i).to_string()))
        })
        .collect()
}

#[test]
fn planted_duplicates_are_found_marked_and_a_rerun_changes_nothing() {
    let (_tmp, dir) = copy_shards();
    let before = table(&all_rows(&dir));
    let spec = dir.display().to_string();
    let s = dedup(&spec, &DedupOptions::default()).unwrap();
    assert_eq!((s.rows, s.ok_rows), (40, 24));

    // What should be found: every planted copy that is ok whose original is ok too.
    let by_id: BTreeMap<u64, &(String, u64, Option<u64>, String, Option<String>)> = before.iter().map(|r| (r.1, r)).collect();
    let mut want: Vec<(String, String)> = before
        .iter()
        .filter(|r| r.3 == "ok")
        .filter_map(|r| r.2.and_then(|o| by_id.get(&o)).filter(|o| o.3 == "ok").map(|o| (r.0.clone(), o.0.clone())))
        .collect();
    want.sort();
    let mut got: Vec<(String, String)> = s.found.iter().map(|f| (f.key.clone(), f.kept.clone())).collect();
    got.sort();
    assert_eq!(got, want, "found {:?}", s.found);
    assert!(want.len() >= 4, "the committed run must plant at least 4 usable pairs");
    assert!(s.exact >= 3 && s.near >= 1, "{s:?}");
    for f in &s.found {
        let (row, orig) = (by_id.values().find(|r| r.0 == f.key).unwrap(), by_id.values().find(|r| r.0 == f.kept).unwrap());
        let planted_exact = (row.1 - 30) % 2 == 0;
        assert_eq!(matches!(f.kind, Kind::Exact), planted_exact, "{f:?} ({row:?} of {orig:?})");
    }

    // The shards say so: status duplicate, the kept key in the reason, nothing else changed.
    let after = table(&all_rows(&dir));
    assert_eq!(after.len(), before.len());
    for (b, a) in before.iter().zip(&after) {
        match s.found.iter().find(|f| f.key == a.0) {
            Some(f) => {
                assert_eq!(a.3, "duplicate");
                assert!(a.4.as_deref().unwrap().starts_with(&format!("duplicate of {} (", f.kept)), "{a:?}");
            }
            None => assert_eq!(a, b),
        }
    }
    // Stats follow, markers are back, metadata is kept.
    let st: recap::sink::ShardStats = serde_json::from_slice(&std::fs::read(dir.join("00001.stats.json")).unwrap()).unwrap();
    assert_eq!(st.status.get("duplicate").copied().unwrap_or(0), s.found.len() as u64);
    assert_eq!(st.status.values().sum::<u64>(), 20);
    let d = st.dedup.unwrap();
    assert_eq!(d.exact + d.near, s.found.len() as u64);
    assert!(dir.join("00001.done").is_file() && !dir.join(".00001.parquet.tmp").exists());
    let file = std::fs::File::open(dir.join("00001.parquet")).unwrap();
    let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let kv = b.metadata().file_metadata().key_value_metadata().unwrap();
    assert!(kv.iter().any(|k| k.key == "recap.teachers"));
    assert!(b.schema().metadata().contains_key("huggingface"), "the Arrow schema's metadata is kept");

    // A rerun finds nothing and writes nothing.
    let mtime = |p: &str| std::fs::metadata(dir.join(p)).unwrap().modified().unwrap();
    let (m0, m1) = (mtime("00000.parquet"), mtime("00001.parquet"));
    let bytes = std::fs::read(dir.join("00001.parquet")).unwrap();
    let again = dedup(&spec, &DedupOptions::default()).unwrap();
    assert!(again.found.is_empty() && again.shards_rewritten.is_empty(), "{again:?}");
    assert_eq!((mtime("00000.parquet"), mtime("00001.parquet")), (m0, m1));
    assert_eq!(std::fs::read(dir.join("00001.parquet")).unwrap(), bytes);
}

#[test]
fn semantic_mode_finds_the_near_copy_by_its_embedding_and_dry_run_writes_nothing() {
    let (_tmp, dir) = copy_shards();
    let before = std::fs::read(dir.join("00001.parquet")).unwrap();
    let opts = DedupOptions { near_bits: None, semantic: Some(0.97), dry_run: true, ..Default::default() };
    let s = dedup(&dir.display().to_string(), &opts).unwrap();
    assert!(s.found.iter().any(|f| matches!(f.kind, Kind::Semantic(c) if c >= 0.97)), "{:?}", s.found);
    assert_eq!(s.near, 0);
    assert_eq!(std::fs::read(dir.join("00001.parquet")).unwrap(), before);
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let e = dedup(&tmp.path().display().to_string(), &DedupOptions::default()).unwrap_err().to_string();
    assert!(e.contains("holds no shards"), "{e}");
    let e = dedup("tests/data/shards", &DedupOptions { near_bits: Some(30), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("at most 15"), "{e}");
    // A file without the hash columns.
    let (b, _) = recap::sink::read_shard(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/shards/00000.parquet")).unwrap();
    let keep: Vec<usize> = (0..b.num_columns()).filter(|&i| b.schema().field(i).name() != "phash").collect();
    let p = b.project(&keep).unwrap();
    let f = tmp.path().join("00000.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&f).unwrap(), p.schema(), None).unwrap();
    w.write(&p).unwrap();
    w.close().unwrap();
    let e = dedup(&tmp.path().display().to_string(), &DedupOptions::default()).unwrap_err().to_string();
    assert!(e.contains("has no column phash"), "{e}");
    // Semantic mode on shards without embeddings.
    let keep: Vec<usize> = (0..b.num_columns()).filter(|&i| !b.schema().field(i).name().ends_with("embeddings")).collect();
    let p = b.project(&keep).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&f).unwrap(), p.schema(), None).unwrap();
    w.write(&p).unwrap();
    w.close().unwrap();
    let e = dedup(&tmp.path().display().to_string(), &DedupOptions { semantic: Some(0.9), ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("image_embeddings"), "{e}");
}
