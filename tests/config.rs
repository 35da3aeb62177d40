//! Pipeline files: the committed JSON Schema matches the code, every example pipeline validates,
//! and error messages (every problem at once, with its YAML path) are snapshot-tested.

use recap::config;

#[test]
fn committed_json_schema_matches_the_code() {
    let committed = std::fs::read_to_string("schemas/pipeline.schema.json").unwrap();
    assert!(
        committed == config::json_schema_text(),
        "schemas/pipeline.schema.json is stale: run `cargo run -- schema pipeline > schemas/pipeline.schema.json`"
    );
}

#[test]
fn committed_training_schema_matches_the_code() {
    let committed = std::fs::read_to_string("schemas/train.schema.json").unwrap();
    assert!(
        committed == recap::train::config::json_schema_text(),
        "schemas/train.schema.json is stale: run `cargo run -- schema train > schemas/train.schema.json`"
    );
}

#[test]
fn committed_finetuning_schema_matches_the_code() {
    let committed = std::fs::read_to_string("schemas/finetune.schema.json").unwrap();
    assert!(
        committed == recap::train::finetune::json_schema_text(),
        "schemas/finetune.schema.json is stale: run `cargo run -- schema finetune > schemas/finetune.schema.json`"
    );
}

#[test]
fn every_pipeline_in_pipelines_validates() {
    let mut n = 0;
    for e in std::fs::read_dir("pipelines").unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            let text = std::fs::read_to_string(&p).unwrap();
            if recap::train::finetune::looks_like_finetune(&text) {
                let cfg = recap::train::finetune::parse_str(&text, &p.display().to_string(), &[])
                    .unwrap_or_else(|e| panic!("{} does not validate:\n{e}", p.display()));
                let v = serde_json::to_value(&cfg).unwrap();
                assert!(jsonschema::is_valid(&recap::train::finetune::json_schema(), &v), "{}", p.display());
                n += 1;
                continue;
            }
            if recap::train::config::looks_like_training(&text) {
                // Training files: schema-checked and typed here; their semantic checks need
                // shards, which tests/train.rs makes.
                let cfg = recap::train::config::parse_str(&text, &p.display().to_string(), &[])
                    .unwrap_or_else(|e| panic!("{} does not validate:\n{e}", p.display()));
                assert!(cfg.problems().is_empty(), "{}: {:?}", p.display(), cfg.problems());
                let v = serde_json::to_value(&cfg).unwrap();
                assert!(jsonschema::is_valid(&recap::train::config::json_schema(), &v), "{}", p.display());
                n += 1;
                continue;
            }
            let cfg = config::parse_str(&text, &p.display().to_string(), &[])
                .unwrap_or_else(|e| panic!("{} does not validate:\n{e}", p.display()));
            // The example round-trips through the schema's own validator too.
            let v = serde_json::to_value(&cfg).unwrap();
            assert!(jsonschema::is_valid(&config::json_schema(), &v), "{}", p.display());
            n += 1;
        }
    }
    assert!(n >= 3);
}

/// The error text, with the current directory (named by missing relative paths) as CWD.
fn redacted(text: String) -> String {
    text.replace(&std::env::current_dir().unwrap().display().to_string(), "CWD")
}

fn errors(yaml: &str) -> String {
    redacted(config::parse_str(yaml, "bad.yaml", &[]).unwrap_err().to_string())
}

#[test]
fn schema_errors_are_all_reported_with_paths() {
    insta::assert_snapshot!("many_problems", errors(
        r#"
input:
  path: urls.parquet
  rows_per_shard: 0
  pasthrough: [width]
download:
  concurrency: -3
  timeout: 10 parsecs
  max_bytes: lots
image:
  resize: centre_crop
  quality: 101
output: {}
"#
    ));
}

#[test]
fn a_top_level_block_written_inside_another_is_named() {
    let e = errors("input:\n  path: urls.parquet\n  storage:\n    options: {}\noutput:\n  path: o\n  engine: {}\n");
    assert!(e.contains("input.storage: unknown key; expected one of:") && e.contains("(`storage` is a top-level block, not a key of `input`)"), "{e}");
    assert!(e.contains("(`engine` is a top-level block, not a key of `output`)"), "{e}");
}

#[test]
fn missing_sections_and_bad_yaml() {
    insta::assert_snapshot!("missing_sections", errors("download:\n  retries: 1\n"));
    insta::assert_snapshot!("not_yaml", errors("input: [unclosed\n"));
    insta::assert_snapshot!("empty", errors(""));
}

#[test]
fn input_problems_name_the_columns_that_exist() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("list.csv");
    std::fs::write(&csv, "link,alt,width\nhttp://a/b.jpg,hi,3\n").unwrap();
    let yaml = format!(
        "input:\n  path: {}\n  passthrough: [width, status, height]\noutput:\n  path: out\ndownload:\n  per_host: 100\n",
        csv.display()
    );
    let cfg = config::parse_str(&yaml, "bad.yaml", &[]).unwrap();
    let msg = config::plan(cfg, "bad.yaml").unwrap_err().to_string().replace(&csv.display().to_string(), "LIST");
    insta::assert_snapshot!("input_columns", msg);

    let cfg = config::parse_str("input:\n  path: no/such/urls.parquet\noutput:\n  path: out\n", "bad.yaml", &[]).unwrap();
    insta::assert_snapshot!("input_missing", redacted(config::plan(cfg, "bad.yaml").unwrap_err().to_string()));
}

#[test]
fn broken_url_lists_say_where() {
    let dir = tempfile::tempdir().unwrap();
    let plan_of = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let yaml = format!("input:\n  path: {}\noutput:\n  path: out\n", path.display());
        config::plan(config::parse_str(&yaml, "p.yaml", &[]).unwrap(), "p.yaml")
    };
    // An empty file: no header, no columns.
    let err = plan_of("empty.csv", "").unwrap_err().to_string();
    assert!(err.contains("has no columns: the file is empty or has no header row"), "{err}");
    // A bad line among the lines the schema is inferred from: its line number, not serde's
    // position inside one line.
    let err = plan_of("early.jsonl", "{\"url\": \"http://a/1.jpg\", \"caption\": \"a\"}\n\n{broken\n").unwrap_err().to_string();
    assert!(err.contains("line 3, column 2: not valid JSON: key must be a string"), "{err}");
    // A bad line past them: the plan opens, and reading the shards stops with the line.
    let mut body = String::new();
    for i in 0..1500 {
        body.push_str(&format!("{{\"url\": \"http://a/{i}.jpg\", \"caption\": \"c{i}\"}}\n"));
    }
    body.push_str("[1, 2]\n");
    let plan = plan_of("late.jsonl", &body).unwrap();
    let err = plan.input.shards().find_map(|s| s.err()).expect("the bad line is an error").to_string();
    assert!(err.contains("line 1501: not a JSON object"), "{err}");
}

#[test]
fn overrides_are_checked_like_the_file() {
    let yaml = "input:\n  path: x.parquet\noutput:\n  path: out\n";
    let err = config::parse_str(yaml, "p.yaml", &["download.concurrency=zero".into(), "image.size=64".into()]).unwrap_err();
    insta::assert_snapshot!("override", redacted(err.to_string()));
    let cfg = config::parse_str(yaml, "p.yaml", &["image.size=64".into(), "download.timeout=2s".into()]).unwrap();
    assert_eq!(cfg.image.size, 64);
    assert_eq!(cfg.download.timeout.0, std::time::Duration::from_secs(2));
}

/// A default the user never wrote follows the value they did: `concurrency: 8` alone gives
/// per_host 8 (the default 16 would exceed it); a per_host they wrote is still checked.
#[test]
fn per_host_follows_a_lower_concurrency_unless_written() {
    let base = "input:\n  path: urls.parquet\noutput:\n  path: out\n";
    let cfg = config::parse_str(&format!("{base}download:\n  concurrency: 8\n"), "p.yaml", &[]).unwrap();
    assert_eq!((cfg.download.concurrency, cfg.download.per_host), (8, 8));
    let cfg = config::parse_str(base, "p.yaml", &["download.concurrency=4".into()]).unwrap();
    assert_eq!(cfg.download.per_host, 4);
    let cfg = config::parse_str(base, "p.yaml", &[]).unwrap();
    assert_eq!((cfg.download.concurrency, cfg.download.per_host), (64, 16));
    let cfg = config::parse_str(&format!("{base}download:\n  concurrency: 8\n  per_host: 12\n"), "p.yaml", &[]).unwrap();
    assert_eq!(cfg.download.per_host, 12, "a written value is kept (and refused by the plan)");
}

/// Politeness settings: a rate is requests per second above 0, `null` turns the limit off.
#[test]
fn rate_per_host_is_checked_and_null_means_no_limit() {
    let base = "input:\n  path: urls.parquet\noutput:\n  path: out\n";
    let cfg = config::parse_str(base, "p.yaml", &[]).unwrap();
    assert_eq!(cfg.download.rate_per_host, Some(50.0));
    assert!(cfg.download.adaptive_concurrency && !cfg.download.respect_robots_txt);
    let cfg = config::parse_str(&format!("{base}download:\n  rate_per_host: null\n  respect_robots_txt: true\n"), "p.yaml", &[]).unwrap();
    assert_eq!(cfg.download.rate_per_host, None);
    assert!(cfg.download.respect_robots_txt);
    let err = config::parse_str(&format!("{base}download:\n  rate_per_host: 0\n"), "p.yaml", &[]).unwrap_err().to_string();
    assert!(err.contains("download.rate_per_host: 0 is less than the minimum of 0.01"), "{err}");
}
