//! `recap query`: SQL over the committed test shards (tests/data/shards, made by
//! scripts/make-test-shards.sh), the embedding functions against values computed here from the
//! raw float16 columns, projection pushdown by bytes read, output formats, the shell on stdin,
//! and bad input.
#![cfg(feature = "query")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use arrow::array::{Array, AsArray, Float32Array, Int32Array, RecordBatch};
use arrow::datatypes::Float16Type;
use recap::query::{self, Format};

fn shards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/shards")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn sql(q: &str) -> query::QueryResult {
    rt().block_on(async {
        let (ctx, _) = query::session(&shards()).await.unwrap();
        query::execute(&ctx, q).await.unwrap_or_else(|e| panic!("{q}: {e}"))
    })
}

fn sql_err(q: &str) -> String {
    rt().block_on(async {
        let (ctx, _) = query::session(&shards()).await.unwrap();
        match query::execute(&ctx, q).await {
            Ok(_) => panic!("{q} should fail"),
            Err(e) => e.to_string(),
        }
    })
}

fn table(q: &str) -> String {
    let r = sql(q);
    query::format_table(&r.batches, &r.schema).unwrap()
}

fn one(r: &query::QueryResult) -> RecordBatch {
    arrow::compute::concat_batches(&r.schema, &r.batches).unwrap()
}

/// The README's example queries (and a few more) over the committed shards.
#[test]
fn golden_queries() {
    let queries = [
        ("status_counts", "SELECT status, count(*) AS n FROM shards GROUP BY status ORDER BY n DESC, status"),
        ("stats", "SELECT shard, rows, ok, filtered, http_error, decode_failed, bytes_written > 0 AS written FROM stats ORDER BY shard"),
        (
            "alt_vs_synthetic",
            "SELECT status, count(*) AS n, round(avg(clip_score), 3) AS alt_text, round(avg(array_max(synthetic_clip_scores)), 3) AS best_synthetic \
             FROM shards WHERE clip_score IS NOT NULL GROUP BY status ORDER BY status",
        ),
        (
            "failing_hosts",
            "SELECT regexp_replace(url, '^[a-z]+://([^/]+)/.*$', '\\1') AS host, status, count(*) AS n FROM shards \
             WHERE status NOT IN ('ok', 'filtered') GROUP BY host, status ORDER BY n DESC, status",
        ),
        ("worst_aligned", "SELECT key, caption, round(clip_score, 3) AS clip_score FROM shards WHERE status = 'ok' ORDER BY clip_score, key LIMIT 5"),
        (
            "near_duplicates",
            "SELECT a.key AS a, b.key AS b, hamming(a.phash, b.phash) AS bits, a.sha256 = b.sha256 AS exact FROM shards a JOIN shards b \
             ON a.key < b.key WHERE hamming(a.phash, b.phash) <= 6 ORDER BY a.key, b.key",
        ),
        (
            "embedding_functions",
            "SELECT key, dims(image_embeddings) AS views, dims(view(image_embeddings, 0)) AS d, \
             round(cosine_sim(view(image_embeddings, 0), caption_embedding(text_embeddings, 0)), 4) AS alt_cos, round(clip_score, 4) AS clip_score, \
             round(l2_norm(teacher(view(image_embeddings, 0), 'shapeworld-clip-b')), 3) AS norm_b FROM shards WHERE status = 'ok' ORDER BY key LIMIT 4",
        ),
        ("table_display", "SELECT key, image, view(image_embeddings, 0) AS v, text_embeddings FROM shards WHERE status = 'ok' ORDER BY key LIMIT 2"),
        ("no_rows", "SELECT key, status FROM shards WHERE status = 'no such status'"),
    ];
    for (name, q) in queries {
        insta::assert_snapshot!(format!("query_{name}"), table(q), q);
    }
}

/// Row `r` of a list<fixed_size_list<f16>> column as f64 vectors.
fn matrix_row(b: &RecordBatch, col: &str, r: usize) -> Vec<Vec<f64>> {
    let l = b.column_by_name(col).unwrap().as_list::<i32>();
    let m = l.value(r);
    let f = m.as_fixed_size_list();
    (0..f.len())
        .map(|i| f.value(i).as_primitive::<Float16Type>().values().iter().map(|x| x.to_f64()).collect())
        .collect()
}

fn cos(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    d / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

#[test]
fn functions_agree_with_values_computed_from_the_columns() {
    // Literals: values worked by hand.
    let b = one(&sql(
        "SELECT cosine_sim([1.0, 0.0], [1.0, 1.0]) AS c, l2_norm([3.0, 4.0]) AS n, hamming(0, 255) AS h, hamming(12, 10) AS h2, \
         dims([1.0, 2.0, 3.0]) AS d, cosine_sim([1.0, 0.0], [0.0, 0.0]) AS zero",
    ));
    let f = |c: &str| b.column_by_name(c).unwrap().as_any().downcast_ref::<Float32Array>().unwrap().clone();
    let i = |c: &str| b.column_by_name(c).unwrap().as_any().downcast_ref::<Int32Array>().unwrap().value(0);
    assert!((f("c").value(0) - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
    assert!((f("n").value(0) - 5.0).abs() < 1e-6);
    assert_eq!((i("h"), i("h2"), i("d")), (8, 2, 3));
    assert!(f("zero").is_null(0), "the cosine with a zero vector is null, not NaN");

    // Against the stored float16 matrices, read here without DataFusion.
    let r = one(&sql(
        "SELECT key, image_embeddings, text_embeddings, cosine_sim(view(image_embeddings, 0), caption_embedding(text_embeddings, 2)) AS c02, \
         cosine_sim(view(image_embeddings, 3), caption_embedding(text_embeddings, 0)) AS c30, \
         cosine_sim(teacher(view(image_embeddings, 0), 'shapeworld-clip-b'), teacher(caption_embedding(text_embeddings, 0), 1)) AS cb, \
         l2_norm(view(image_embeddings, 1)) AS n1, view(image_embeddings, 99) AS missing, teacher(view(image_embeddings, 0), 'shapeworld-clip-a') AS ta, \
         hamming(phash, 0) AS ones, phash FROM shards WHERE status = 'ok' ORDER BY key",
    ));
    assert!(r.num_rows() >= 20, "{} ok rows", r.num_rows());
    let col = |c: &str| r.column_by_name(c).unwrap().as_any().downcast_ref::<Float32Array>().unwrap().clone();
    let (c02, c30, cb, n1) = (col("c02"), col("c30"), col("cb"), col("n1"));
    let ta = r.column_by_name("ta").unwrap().as_fixed_size_list();
    assert_eq!(ta.value_length(), 64);
    let ones = r.column_by_name("ones").unwrap().as_any().downcast_ref::<Int32Array>().unwrap();
    let phash = r.column_by_name("phash").unwrap().as_primitive::<arrow::datatypes::UInt64Type>();
    for row in 0..r.num_rows() {
        let img = matrix_row(&r, "image_embeddings", row);
        let txt = matrix_row(&r, "text_embeddings", row);
        assert!((c02.value(row) as f64 - cos(&img[0], &txt[2])).abs() < 1e-5);
        assert!((c30.value(row) as f64 - cos(&img[3], &txt[0])).abs() < 1e-5);
        assert!((cb.value(row) as f64 - cos(&img[0][64..], &txt[0][64..])).abs() < 1e-5);
        let norm: f64 = img[1].iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((n1.value(row) as f64 - norm).abs() < 1e-5);
        let a: Vec<f64> = ta.value(row).as_primitive::<Float16Type>().values().iter().map(|x| x.to_f64()).collect();
        assert_eq!(a, img[0][..64].to_vec(), "teacher('shapeworld-clip-a') is the first 64 values");
        assert_eq!(ones.value(row) as u32, phash.value(row).count_ones());
    }
    assert_eq!(r.column_by_name("missing").unwrap().null_count(), r.num_rows(), "a view past the last is null");

    // Mistakes are named at planning time.
    let e = sql_err("SELECT teacher(view(image_embeddings, 0), 'clip-z') FROM shards");
    assert!(e.contains("shapeworld-clip-a (index 0, 64 dims)") && e.contains("shapeworld-clip-b"), "{e}");
    let e = sql_err("SELECT cosine_sim(caption, caption) FROM shards");
    assert!(e.contains("must be a vector"), "{e}");
    let e = sql_err("SELECT view(clip_score, 0) FROM shards");
    assert!(e.contains("list of vectors such as image_embeddings"), "{e}");
}

/// `embed_text` runs the teachers' ONNX text towers: the alt-text's embedding computed now equals
/// the one the score stage stored (float16) for the same text.
#[test]
fn embed_text_reproduces_the_stored_text_embeddings() {
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    let r = one(&sql(
        "SELECT key, caption, cosine_sim(embed_text(caption), caption_embedding(text_embeddings, 0)) AS same, \
         cosine_sim(embed_text('a red circle'), view(image_embeddings, 0)) AS to_text \
         FROM shards WHERE status = 'ok' ORDER BY key LIMIT 6",
    ));
    let same = r.column_by_name("same").unwrap().as_any().downcast_ref::<Float32Array>().unwrap();
    let to_text = r.column_by_name("to_text").unwrap().as_any().downcast_ref::<Float32Array>().unwrap();
    for i in 0..r.num_rows() {
        assert!(same.value(i) > 0.999, "row {i}: {}", same.value(i));
        assert!(to_text.value(i).abs() <= 1.0 && to_text.is_valid(i));
    }
}

#[test]
fn a_two_column_query_reads_a_small_fraction_of_the_files() {
    let total: u64 = std::fs::read_dir(shards())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let small = sql("SELECT status, clip_score FROM shards").bytes_scanned;
    let images = sql("SELECT key, image FROM shards").bytes_scanned;
    assert!(small > 0 && (small as f64) < 0.05 * total as f64, "status + clip_score read {small} of {total} bytes");
    assert!(images as f64 > 0.3 * total as f64, "the image column is most of the files: {images} of {total}");
}

#[test]
fn results_write_as_csv_json_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let r = sql("SELECT key, status, clip_score, synthetic_captions, view(image_embeddings, 0) AS v, image FROM shards ORDER BY key");
    let n = r.batches.iter().map(|b| b.num_rows()).sum::<usize>();
    assert_eq!(n, 40);
    let csv = dir.path().join("r.csv");
    query::write_result(&r, Format::Csv, Some(&csv)).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut rdr = text.lines();
    assert_eq!(rdr.next().unwrap(), "key,status,clip_score,synthetic_captions,v,image");
    assert_eq!(text.lines().count(), n + 1);
    assert!(text.contains("\"[\"\"") || text.contains("[\""), "lists as JSON text: {}", &text[..300]);
    let json = dir.path().join("r.jsonl");
    query::write_result(&r, Format::Json, Some(&json)).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&json).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), n);
    let ok = lines.iter().find(|l| l["status"] == "ok").unwrap();
    assert_eq!(ok["v"].as_array().unwrap().len(), 112, "embeddings as float arrays: {ok}");
    let pq = dir.path().join("r.parquet");
    query::write_result(&r, Format::Parquet, Some(&pq)).unwrap();
    let (back, _) = recap::sink::read_shard(&pq).unwrap();
    assert_eq!(back.num_rows(), n);
    assert_eq!(back.schema().field_with_name("v").unwrap().data_type(), r.schema.field_with_name("v").unwrap().data_type());
    let e = query::write_result(&r, Format::Parquet, None).unwrap_err().to_string();
    assert!(e.contains("--output"), "{e}");
}

fn recap(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_recap"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_shell_runs_statements_from_stdin() {
    let s = shards().display().to_string();
    let out = recap(&["query", "--shards", &s], "SELECT count(*) AS n FROM shards;\n-- a comment; ignored\nSELECT 'a;b' AS t,\n  1 AS one;\n");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("| 40 |") && text.contains("| a;b | 1   |"), "{text}");
    // Backslash commands on lines of their own, between statements, as psql and duckdb take them
    // from a pipe; a `\` inside a statement is the statement's; `\q` ends the script.
    let out = recap(
        &["query", "--shards", &s, "--format", "csv"],
        "\\d\n\\d stats\nSELECT '\\d' AS t\n  ;\n\\df\n\\q\nSELECT 'not run';\n",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("shards  ") && text.contains("stats   one row per shard"), "\\d: {text}");
    assert!(text.contains("config_hash") && text.contains("Utf8"), "\\d stats: {text}");
    assert!(text.contains("t\n\\d\n"), "the statement: {text}");
    assert!(text.contains("cosine_sim(a, b)"), "\\df: {text}");
    assert!(!text.contains("not run"), "\\q: {text}");
    // A mistyped column: exit 1, the columns listed.
    let out = recap(&["query", "--shards", &s, "SELECT clip_scor FROM shards"], "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No field named clip_scor") && err.contains("columns of shards: key, uid, url"), "{err}");
    // --format json to stdout.
    let out = recap(&["query", "--shards", &s, "--format", "json", "SELECT key FROM shards ORDER BY key LIMIT 2"], "");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"key\":\"000000000\"}\n{\"key\":\"000000001\"}\n");
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let e = rt().block_on(query::session(dir.path())).err().unwrap().to_string();
    assert!(e.contains("holds no shards"), "{e}");
    let e = rt().block_on(query::session(&dir.path().join("nowhere"))).err().unwrap().to_string();
    assert!(e.contains("no such directory"), "{e}");
    // A shard from another schema version beside a current one.
    std::fs::copy(shards().join("00000.parquet"), dir.path().join("00000.parquet")).unwrap();
    let (b, _) = recap::sink::read_shard(&shards().join("00001.parquet")).unwrap();
    let old = dir.path().join("00001.parquet");
    let props = parquet::file::properties::WriterProperties::builder()
        .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new("recap.schema_version".into(), "0".to_string())]))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&old).unwrap(), b.schema(), Some(props)).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
    let e = rt().block_on(query::session(dir.path())).err().unwrap().to_string();
    assert!(e.contains("shards of two schema versions") && e.contains("00000.parquet has 1") && e.contains("00001.parquet has 0"), "{e}");
    // A plain (not reinforced) shard: the functions that need teachers say so.
    let plain = tempfile::tempdir().unwrap();
    let keep: Vec<usize> = (0..b.num_columns()).filter(|&i| b.schema().field(i).name() != "image_embeddings" && b.schema().field(i).name() != "text_embeddings").collect();
    let p = b.project(&keep).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(plain.path().join("00000.parquet")).unwrap(), p.schema(), None).unwrap();
    w.write(&p).unwrap();
    w.close().unwrap();
    let e = rt().block_on(async {
        let (ctx, _) = query::session(plain.path()).await.unwrap();
        query::execute(&ctx, "SELECT embed_text('a')").await.err().unwrap().to_string()
    });
    assert!(e.contains("no recap.teachers metadata"), "{e}");
}

/// `filter.sql` compiles against a shard's schema, embedding functions included, and keeps the
/// rows the same condition selects in `recap query`.
#[test]
fn a_pipeline_sql_filter_agrees_with_the_query() {
    let (b, _) = recap::sink::read_shard(&shards().join("00000.parquet")).unwrap();
    let teachers = vec![
        recap::train::data::Teacher { model: "models/shapeworld-clip-a".into(), dim: 64 },
        recap::train::data::Teacher { model: "models/shapeworld-clip-b".into(), dim: 48 },
    ];
    let cond = "status = 'ok' AND cosine_sim(view(image_embeddings, 0), caption_embedding(text_embeddings, 1)) > 0.5 AND width >= 100";
    let f = recap::query::filter::SqlFilter::compile(cond, &b.schema(), &teachers).unwrap();
    let keep = f.keep(&b).unwrap();
    let r = one(&sql(&format!("SELECT key FROM shards WHERE key LIKE '00000%' AND {cond} ORDER BY key")));
    let want: Vec<String> = (0..r.num_rows()).map(|i| r.column(0).as_string::<i32>().value(i).to_string()).collect();
    let key = b.column_by_name("key").unwrap().as_string::<i32>();
    let got: Vec<String> = (0..b.num_rows()).filter(|&i| keep[i]).map(|i| key.value(i).to_string()).collect();
    assert_eq!(got, want);
    assert!(!got.is_empty() && got.len() < b.num_rows());
    let e = recap::query::filter::SqlFilter::compile("width", &b.schema(), &teachers).unwrap_err();
    assert!(e.contains("needs a condition"), "{e}");
}
