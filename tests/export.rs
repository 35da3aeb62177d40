//! `recap export webdataset` on the committed test shards, read back by the `webdataset`
//! package as open_clip reads it; the npz arrays equal the shards' float16 embeddings.

use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float16Type;
use recap::export::{webdataset, ExportOptions};
use serde_json::Value;

fn python() -> String {
    std::env::var("RECAP_PYTHON").unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python").display().to_string())
}

#[test]
fn webdataset_reads_the_export_and_its_arrays_are_the_shards_embeddings() {
    let shards = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/shards");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("wds");
    let s = webdataset(&shards.display().to_string(), &out, &ExportOptions { samples_per_tar: 10, ..Default::default() }).unwrap();
    assert_eq!((s.rows, s.samples), (40, 24));
    assert_eq!(s.tars.iter().map(|t| t.1).collect::<Vec<_>>(), vec![10, 10, 4]);
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')), "no temporaries left");

    let py = python();
    assert!(Path::new(&py).exists(), "no Python at {py}: run `bash scripts/python-env.sh` (scripts/test.sh does)");
    let o = std::process::Command::new(&py).arg("tests/interop/webdataset_read.py").arg(&out).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["open_clip_pairs"], 24);
    assert_eq!(v["manifest_samples"], 24);
    assert_eq!(v["first_pair"][0], serde_json::json!([128, 128]));

    // Every ok row is a sample whose members and arrays match the shard.
    let mut seen = 0;
    for f in ["00000.parquet", "00001.parquet"] {
        let (b, _) = recap::sink::read_shard(&shards.join(f)).unwrap();
        let key = b.column_by_name("key").unwrap().as_string::<i32>();
        let status = b.column_by_name("status").unwrap().as_string::<i32>();
        let cap = b.column_by_name("caption").unwrap().as_string::<i32>();
        let sha = b.column_by_name("sha256").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            let sample = &v["samples"][key.value(i)];
            if status.value(i) != "ok" {
                assert!(sample.is_null(), "{} is {} and must not be exported", key.value(i), status.value(i));
                continue;
            }
            seen += 1;
            assert_eq!(sample["members"], serde_json::json!(["jpg", "json", "npz", "paug.json", "syn.json", "txt", "url.txt"]));
            assert_eq!(sample["txt"], cap.value(i));
            assert_eq!(sample["meta"]["sha256"], sha.value(i));
            assert_eq!(sample["syn"].as_array().unwrap().len(), 3);
            assert_eq!(sample["views"], 5);
            for (col, name) in [("image_embeddings", "image_emb"), ("text_embeddings", "text_emb")] {
                let m = b.column_by_name(col).unwrap().as_list::<i32>().value(i);
                let m = m.as_fixed_size_list();
                let want: Vec<f64> = (0..m.len()).flat_map(|r| m.value(r).as_primitive::<Float16Type>().values().iter().map(|x| x.to_f64()).collect::<Vec<_>>()).collect();
                assert_eq!(sample[name]["dtype"], "float16");
                assert_eq!(sample[name]["shape"], serde_json::json!([m.len(), 112]));
                let got: Vec<f64> = sample[name]["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                assert_eq!(got, want, "{} {name}", key.value(i));
            }
        }
    }
    assert_eq!(seen, 24);
}

#[test]
fn export_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let e = webdataset(&tmp.path().display().to_string(), &tmp.path().join("o"), &ExportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("holds no shards"), "{e}");
    let shards = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/shards").display().to_string();
    let e = webdataset(&shards, &tmp.path().join("o"), &ExportOptions { samples_per_tar: 0, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
    // Filtered rows on request: no image (the filter dropped it), the rest of the members.
    let s = webdataset(&shards, &tmp.path().join("f"), &ExportOptions { samples_per_tar: 100, statuses: vec!["filtered".into()] }).unwrap();
    assert_eq!(s.samples, 12);
}
