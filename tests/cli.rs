//! The binary as a user runs it: the demo end to end, validate, schema, query, exit codes.

use std::process::Command;

fn recap(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_recap")).args(args).output().unwrap()
}

#[test]
fn demo_runs_end_to_end_and_query_reads_its_shards() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let out = recap(&["demo", "--count", "60", "--no-progress", "--dir", d.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("run summary"), "{text}");
    assert!(text.contains("60 rows"), "{text}");
    for status in ["ok", "http_error", "timeout", "too_large", "too_many_pixels", "opted_out", "too_many_redirects"] {
        assert!(text.contains(status), "demo output lacks {status}:\n{text}");
    }
    // The model stages ran: example rows with synthetic captions and scores are printed.
    assert!(text.contains("examples from") && text.contains("synthetic "), "{text}");
    let q = recap(&["query", "--shards", d.join("shards").to_str().unwrap(), "SELECT count(*) AS n FROM shards"]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    assert!(String::from_utf8_lossy(&q.stdout).contains("| 60 |"), "{}", String::from_utf8_lossy(&q.stdout));
    // A bad query: exit 1, and DataFusion's message said once (its error repeats its sources).
    let q = recap(&["query", "--shards", d.join("shards").to_str().unwrap(), "SELECT nope FROM shards"]);
    let err = String::from_utf8_lossy(&q.stderr);
    assert_eq!(q.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("No field named nope").count(), 1, "{err}");
}

#[test]
fn validate_reports_problems_with_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, "input:\n  path: nowhere.parquet\n  bogus: 1\noutput:\n  path: out\n").unwrap();
    let out = recap(&["validate", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("input.bogus: unknown key"), "{err}");
    let usage = recap(&["run", p.to_str().unwrap(), "--worker", "3/2"]);
    assert_ne!(usage.status.code(), Some(0));
}

#[test]
fn schema_commands_print_the_committed_schemas() {
    let out = recap(&["schema", "pipeline"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), std::fs::read_to_string("schemas/pipeline.schema.json").unwrap());
    let shard = String::from_utf8_lossy(&recap(&["schema", "shard"]).stdout).to_string();
    for col in ["key", "uid", "status", "reason", "image", "sha256", "phash", "synthetic_captions", "image_embeddings", "clip_score"] {
        assert!(shard.lines().any(|l| l.starts_with(col)), "{col} missing from:\n{shard}");
    }
    let line = |col: &str| shard.lines().find(|l| l.starts_with(&format!("{col} "))).unwrap_or_default().to_string();
    assert!(line("image").contains("struct<bytes: binary, path: utf8>"), "{}", line("image"));
    assert!(line("image_embeddings").contains("list<fixed_size_list<float16, D>>"), "{}", line("image_embeddings"));
}

/// A recap built without the `cluster` feature says how to get distributed SQL, with exit code 2.
#[cfg(not(feature = "cluster"))]
#[test]
fn cluster_commands_without_the_feature_say_how_to_build_it() {
    for args in [&["cluster", "scheduler"][..], &["query", "--cluster", "df://127.0.0.1:1", "SELECT 1"][..]] {
        let out = recap(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features cluster"), "{args:?}");
    }
}
