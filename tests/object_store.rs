//! Input lists and shards in an S3 bucket, against a real S3-protocol server: moto's
//! (`moto_server`, PyPI `moto[server]`, installed in .venv by scripts/python-env.sh), and in an
//! Azure Blob Storage container, against Microsoft's emulator Azurite (npm `azurite`, installed in
//! tests/azurite by scripts/azurite-env.sh), each started by its test on a free loopback port.
//! The recap binary runs as a user runs it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use recap::config::StorageConfig;
use recap::storage::{blocking, Remote};
use recap::synth::ServeOptions;

/// A server process a test started (moto, Azurite), killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` and wait until it listens on `port` on 127.0.0.1 (30 s at most). A server that
/// exits first fails the test, with what it wrote to `stderr_file` if it wrote there.
fn start_server(mut cmd: Command, port: u16, what: &str, stderr_file: Option<&Path>) -> Server {
    let mut server = Server(cmd.spawn().unwrap_or_else(|e| panic!("{what} starts: {e}")));
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = server.0.try_wait().unwrap() {
            let err = stderr_file.and_then(|f| std::fs::read_to_string(f).ok()).unwrap_or_default();
            panic!("{what} exited ({status}) before it listened: {err}");
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

struct Moto {
    _server: Server,
    endpoint: String,
}

/// The project's Python (.venv, from scripts/python-env.sh), where moto and the Azure SDK are.
fn python() -> PathBuf {
    std::env::var("RECAP_PYTHON").map(PathBuf::from).unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

fn moto_server() -> PathBuf {
    let bin = python().with_file_name("moto_server");
    assert!(bin.is_file(), "{} is missing: run scripts/python-env.sh (installs moto[server])", bin.display());
    bin
}

/// A moto S3 server on a free port. `unsigned_calls`: None accepts any key; Some(n) checks
/// credentials, signatures and IAM policies (moto's IAM) after the first n calls.
fn start_moto(unsigned_calls: Option<u32>) -> Moto {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = Command::new(moto_server());
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(n) = unsigned_calls {
        cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
    }
    Moto { _server: start_server(cmd, port, "moto_server", None), endpoint: format!("http://127.0.0.1:{port}") }
}

fn create_bucket(m: &Moto, bucket: &str) {
    let url = format!("{}/{bucket}", m.endpoint);
    let status = blocking(async move { reqwest::Client::new().put(url).send().await.unwrap().status() });
    assert!(status.is_success(), "create bucket: {status}");
}

fn storage(m: &Moto, key: &str) -> StorageConfig {
    let mut s = StorageConfig::default();
    for (k, v) in [
        ("aws_endpoint", m.endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_region", "us-east-1"),
        ("aws_access_key_id", key),
        ("aws_secret_access_key", "secret"),
    ] {
        s.options.insert(k.into(), v.into());
    }
    s
}

fn storage_yaml(m: &Moto, key: &str, threshold: &str) -> String {
    format!(
        "storage:\n  multipart_threshold: {threshold}\n  part_size: 5MiB\n  options:\n    aws_endpoint: {}\n    aws_allow_http: \"true\"\n    aws_region: us-east-1\n    aws_access_key_id: {key}\n    aws_secret_access_key: secret\n",
        m.endpoint
    )
}

fn recap(args: &[&str], staging: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_recap"))
        .args(args)
        .env("RECAP_STAGING", staging)
        // The environment's AWS settings must not leak into the test.
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AZURE_STORAGE_ACCOUNT_NAME")
        .env_remove("AZURE_STORAGE_ACCOUNT_KEY")
        .env_remove("AZURE_STORAGE_ENDPOINT")
        .output()
        .unwrap()
}

/// Multipart uploads the server still has open for `key` (S3 ListMultipartUploads).
fn open_uploads(m: &Moto, bucket: &str) -> String {
    let url = format!("{}/{bucket}?uploads", m.endpoint);
    blocking(async move { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

/// Row ids of every committed shard under `prefix`, read back through the store.
fn committed_ids(remote: &Remote) -> (BTreeSet<u64>, Vec<u64>) {
    let r = remote.clone();
    let done = blocking(async move { r.completed().await.unwrap() });
    (done.into_iter().collect(), statuses(remote).into_iter().map(|(id, _)| id).collect())
}

fn write_pipeline(dir: &Path, input: &str, output: &str, rows_per_shard: u64, concurrency: u32, storage: &str) -> PathBuf {
    let text = format!(
        "input:\n  path: {input}\n  passthrough: [id]\n  rows_per_shard: {rows_per_shard}\ndownload:\n  concurrency: {concurrency}\n  rate_per_host: null\n  allow_private_networks: true\nimage:\n  size: 64\n  min_size: 1\noutput:\n  path: {output}\n{storage}"
    );
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Workers on one machine share the staging directory (Slurm array tasks on a node, all with
/// the default temporary directory): four `--worker I/4` started at once on an input list in a
/// bucket each download it there, and none reads another's half-written copy. Three rounds; when
/// downloads wrote the staged file in place, 26 of 40 such worker runs failed reading it
/// (`Parquet file too small`, `Corrupt footer`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_staging_directory_read_whole_input_lists() {
    use arrow::array::{RecordBatch, StringArray};
    let tmp = tempfile::tempdir().unwrap();
    // 100,000 rows (8.8 MB, uncompressed so the download takes a while), every URL refused at
    // once (ftp), so the runs do little besides reading the list.
    let list = tmp.path().join("urls.parquet");
    let n = 100_000;
    let urls: StringArray = (0..n).map(|i| Some(format!("ftp://x/{i}.jpg"))).collect();
    let caps: StringArray = (0..n).map(|i| Some(format!("caption {i} ").repeat(6))).collect();
    let ids: arrow::array::UInt64Array = (0..n as u64).collect();
    let batch = RecordBatch::try_from_iter([
        ("url", std::sync::Arc::new(urls) as _),
        ("caption", std::sync::Arc::new(caps) as _),
        ("id", std::sync::Arc::new(ids) as _),
    ])
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder().set_compression(parquet::basic::Compression::UNCOMPRESSED).build();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&list).unwrap(), batch.schema(), Some(props)).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let tmp_path = tmp.path().to_path_buf();
    let (m, runs) = tokio::task::spawn_blocking(move || {
        let m = start_moto(None);
        create_bucket(&m, "data");
        let lists = Remote::open("s3://data/lists", &storage(&m, "test")).unwrap();
        blocking(async move { lists.upload_file(&list, "urls.parquet").await.unwrap() });
        let mut runs = Vec::new();
        for round in 0..3 {
            let staging = tmp_path.join(format!("staging-{round}"));
            std::fs::create_dir_all(&staging).unwrap();
            let out = format!("s3://data/out-{round}");
            let p = write_pipeline(&tmp_path, "s3://data/lists/urls.parquet", &out, 10_000, 16, &storage_yaml(&m, "test", "16MB"));
            let workers: Vec<_> = (0..4)
                .map(|i| {
                    Command::new(env!("CARGO_BIN_EXE_recap"))
                        .args(["run", p.to_str().unwrap(), "--no-progress", "--worker", &format!("{i}/4")])
                        .env("RECAP_STAGING", &staging)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let outputs: Vec<_> = workers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
            let ok = outputs.iter().all(|o| o.status.success());
            runs.extend(outputs);
            if ok {
                let out = Remote::open(&out, &storage(&m, "test")).unwrap();
                let done = blocking(async move { out.completed().await.unwrap() });
                assert_eq!(done.len(), 10, "round {round}: every shard committed");
            }
        }
        (m, runs)
    })
    .await
    .unwrap();
    let failed: Vec<String> = runs.iter().filter(|o| !o.status.success()).map(|o| String::from_utf8_lossy(&o.stderr).to_string()).collect();
    assert!(failed.is_empty(), "{} of {} worker runs failed: {failed:?}", failed.len(), runs.len());
    drop(m);
}

/// `--retry-failed` on a bucket: the committed shards are fetched, their retryable rows tried
/// again, and the shards rewritten in place (multipart, marker last): every row still once, the
/// flaky ones now ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_rewrites_shards_in_a_bucket() {
    let w = world(40, 0, "flaky=6", ServeOptions::default()).await;
    let (tmp, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let m = tokio::task::spawn_blocking(|| {
        let m = start_moto(None);
        create_bucket(&m, "data");
        m
    })
    .await
    .unwrap();
    let p = write_pipeline(tmp.path(), w.urls.to_str().unwrap(), "s3://data/retry", 20, 16, &storage_yaml(&m, "test", "1KB"));
    let out = Remote::open("s3://data/retry", &storage(&m, "test")).unwrap();
    let sp = staging.path().to_path_buf();
    let (m, first, retry, before, after, uploads) = tokio::task::spawn_blocking(move || {
        // No retries within a run: the flaky rows (503 on the first request) fail the first run.
        let run = |extra: &[&str]| recap(&[&["run", p.to_str().unwrap(), "--no-progress", "--set", "download.retries=0"], extra].concat(), &sp);
        let first = run(&[]);
        let before = statuses(&out);
        let retry = run(&["--retry-failed"]);
        let after = statuses(&out);
        let uploads = open_uploads(&m, "data");
        (m, first, retry, before, after, uploads)
    })
    .await
    .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(before.iter().filter(|(_, s)| s != "ok").count(), 6, "{before:?}");
    assert!(retry.status.success(), "{}", String::from_utf8_lossy(&retry.stderr));
    let stdout = String::from_utf8_lossy(&retry.stdout);
    assert!(stdout.contains("2 retried") && stdout.contains("retried rows: 6 re-attempted, 6 now ok"), "{stdout}");
    assert_eq!(after.iter().map(|(id, _)| *id).collect::<Vec<_>>(), (0..40).collect::<Vec<u64>>(), "every row once");
    assert!(after.iter().all(|(_, s)| s == "ok"), "{after:?}");
    assert!(!uploads.contains("<Key>retry/"), "no upload left open: {uploads}");
    drop((m, tmp, w));
}

/// (id, status) of every row in the committed shards under `remote`, by id.
fn statuses(remote: &Remote) -> Vec<(u64, String)> {
    let r = remote.clone();
    let mut rows = blocking(async move {
        let mut rows = Vec::new();
        for s in r.completed().await.unwrap() {
            let bytes = r.get(&r.child(&format!("{s:05}.parquet"))).await.unwrap();
            for b in parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap() {
                let b = b.unwrap();
                rows.extend(u64s(&b, "id").into_iter().zip(strings(&b, "status").into_iter().map(Option::unwrap)));
            }
        }
        rows
    });
    rows.sort();
    rows
}

/// The URL list read from the bucket, shards written to it with every Parquet file as a multipart
/// upload, a multipart upload an interrupted run left open aborted, and a rerun that finds every
/// shard committed and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reads_and_writes_s3_and_resumes() {
    let w = world(60, 0, "", ServeOptions::default()).await;
    let (tmp, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (tmp_path, staging_path) = (tmp.path().to_path_buf(), staging.path().to_path_buf());
    let urls = w.urls.clone();
    let (m, out) = tokio::task::spawn_blocking(move || {
        let m = start_moto(None);
        create_bucket(&m, "data");
        let lists = Remote::open("s3://data/lists", &storage(&m, "test")).unwrap();
        blocking(async move { lists.upload_file(&urls, "urls.parquet").await.unwrap() });
        // A multipart upload a killed run left open on shard 1, with its record.
        let out = Remote::open("s3://data/run", &storage(&m, "test")).unwrap();
        let (o, endpoint) = (out.clone(), m.endpoint.clone());
        blocking(async move {
            use object_store::multipart::MultipartStore;
            use object_store::ObjectStoreExt;
            let s3 = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name("data")
                .with_endpoint(endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("secret")
                .build()
                .unwrap();
            let id = s3.create_multipart(&o.child("00001.parquet")).await.unwrap();
            o.store.put(&o.child(".00001.parquet.upload"), id.into_bytes().into()).await.unwrap();
        });
        assert!(open_uploads(&m, "data").contains("run/00001.parquet"), "the left-over upload is open before the run");
        (m, out)
    })
    .await
    .unwrap();
    let p = write_pipeline(&tmp_path, "s3://data/lists/urls.parquet", "s3://data/run", 20, 16, &storage_yaml(&m, "test", "1KB"));
    let p2 = p.clone();
    let sp = staging_path.clone();
    let first = tokio::task::spawn_blocking(move || recap(&["run", p2.to_str().unwrap(), "--no-progress"], &sp)).await.unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stdout = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(stdout.contains("3 written") && stdout.contains("s3://data/run"), "{stdout}");
    let uploads = open_uploads(&m, "data");
    assert!(!uploads.contains("<UploadId>"), "no multipart upload left open (the old one aborted, the new ones completed): {uploads}");
    let o = out.clone();
    let names: Vec<String> = tokio::task::spawn_blocking(move || blocking(async move { o.list_names().await.unwrap() })).await.unwrap().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n.ends_with(".upload")), "upload records removed: {names:?}");
    let o = out.clone();
    let (done, ids) = tokio::task::spawn_blocking(move || committed_ids(&o)).await.unwrap();
    assert_eq!(done, BTreeSet::from([0, 1, 2]));
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, (0..60).collect::<Vec<u64>>(), "every row once");
    // Staging holds nothing once shards are up.
    let staged: Vec<_> = walk(&staging_path).into_iter().filter(|p| p.extension().is_some_and(|e| e == "parquet") && p.to_string_lossy().contains("recap-shards")).collect();
    assert!(staged.is_empty(), "staged shard files left: {staged:?}");
    let p2 = p.clone();
    let sp = staging_path.clone();
    let again = tokio::task::spawn_blocking(move || recap(&["run", p2.to_str().unwrap(), "--no-progress"], &sp)).await.unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 written, 3 already complete (skipped)"), "{}", String::from_utf8_lossy(&again.stdout));

    // Readers take the same URL (credentials from the environment, as a user's shell has them),
    // and see only committed shards: a Parquet file uploaded without its marker is not read.
    let o = out.clone();
    let stray = tmp_path.join("stray.parquet");
    std::fs::copy(&w.urls, &stray).unwrap();
    tokio::task::spawn_blocking(move || blocking(async move { o.upload_file(&stray, "00007.parquet").await.unwrap() })).await.unwrap();
    let (endpoint, sp) = (m.endpoint.clone(), staging_path.clone());
    let (report, wds) = (tmp_path.join("report.html"), tmp_path.join("wds"));
    let (r, x) = (report.to_str().unwrap().to_string(), wds.to_str().unwrap().to_string());
    let [q, report_out, export_out] = tokio::task::spawn_blocking(move || {
        let reader = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_recap"))
                .args(args)
                .env("RECAP_STAGING", &sp)
                .envs([("AWS_ENDPOINT_URL", endpoint.as_str()), ("AWS_ALLOW_HTTP", "true"), ("AWS_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "secret")])
                .output()
                .unwrap()
        };
        [
            reader(&["query", "--shards", "s3://data/run", "--format", "csv", "SELECT count(*) AS n, count(DISTINCT id) AS ids, count(*) FILTER (WHERE status = 'ok') AS ok FROM shards"]),
            reader(&["report", "--shards", "s3://data/run", "--out", &r]),
            reader(&["export", "webdataset", "--shards", "s3://data/run", "--out", &x]),
        ]
    })
    .await
    .unwrap();
    for o in [&q, &report_out, &export_out] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(String::from_utf8_lossy(&q.stdout).trim(), "n,ids,ok\n60,60,60", "the three committed shards, not the stray file");
    let said = String::from_utf8_lossy(&report_out.stdout);
    assert!(said.contains("of 60 in 3 shard file(s)") && report.is_file(), "{said}");
    let said = String::from_utf8_lossy(&export_out.stdout);
    assert!(said.contains("exported 60 of 60 rows (ok)") && wds.join("manifest.json").is_file(), "{said}");
    drop(m);
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Runs killed with SIGKILL at moments spread over the run (uploads included), then resumed:
/// in the end every shard is committed once and every row is there once; a shard whose upload
/// was cut is never visible as committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_killed_mid_upload_resume_to_every_row_once() {
    // 120 rows, 4 at a time, 100 ms each: about 3 s of work, cut by kills at 0.5, 0.9 and 1.3 s.
    let w = world(120, 0, "", ServeOptions { latency: Duration::from_millis(100), ..ServeOptions::default() }).await;
    let (tmp, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (tmp_path, staging_path) = (tmp.path().to_path_buf(), staging.path().to_path_buf());
    let urls = w.urls.clone();
    let m = tokio::task::spawn_blocking(move || {
        let m = start_moto(None);
        create_bucket(&m, "data");
        let lists = Remote::open("s3://data/lists", &storage(&m, "test")).unwrap();
        blocking(async move { lists.upload_file(&urls, "urls.parquet").await.unwrap() });
        m
    })
    .await
    .unwrap();
    let p = write_pipeline(&tmp_path, "s3://data/lists/urls.parquet", "s3://data/killed", 10, 4, &storage_yaml(&m, "test", "1KB"));
    let out = Remote::open("s3://data/killed", &storage(&m, "test")).unwrap();
    kill_and_resume(p, staging_path, out).await;
    let m2 = m;
    let uploads = tokio::task::spawn_blocking(move || {
        let u = open_uploads(&m2, "data");
        drop(m2);
        u
    })
    .await
    .unwrap();
    assert!(!uploads.contains("<UploadId>"), "no multipart upload left open: {uploads}");
}

/// `recap run` of a 120-row, 12-shard pipeline (10 rows per shard, 4 downloads at a time, 100 ms
/// each: about 3 s of work) killed with SIGKILL at 0.5, 0.9 and 1.3 s, each time checking that what
/// is committed in `out` is whole, then run to the end: every shard committed, every row once.
async fn kill_and_resume(p: PathBuf, staging_path: PathBuf, out: Remote) {
    let mut kills = 0;
    for delay_ms in [500u64, 900, 1300] {
        let p2 = p.clone();
        let sp = staging_path.clone();
        let o = out.clone();
        let killed = tokio::task::spawn_blocking(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_recap"))
                .args(["run", p2.to_str().unwrap(), "--no-progress"])
                .env("RECAP_STAGING", &sp)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(delay_ms));
            let running = child.try_wait().unwrap().is_none();
            let _ = child.kill();
            let _ = child.wait();
            // Whatever is committed so far is whole: each marked shard reads back with its rows.
            let (done, ids) = committed_ids(&o);
            assert_eq!(ids.len(), done.len() * 10, "committed shards are complete");
            running
        })
        .await
        .unwrap();
        kills += killed as u32;
    }
    assert!(kills >= 1, "at least one run was killed while running");
    let last = tokio::task::spawn_blocking(move || recap(&["run", p.to_str().unwrap(), "--no-progress"], &staging_path)).await.unwrap();
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
    let (done, mut ids) = tokio::task::spawn_blocking(move || committed_ids(&out)).await.unwrap();
    assert_eq!(done, (0..12).collect::<BTreeSet<u64>>());
    ids.sort();
    assert_eq!(ids, (0..120).collect::<Vec<u64>>(), "every row once after {kills} kills");
}

/// A moto S3 server that checks every request's signature against an IAM key it made (three
/// unsigned calls make the user, its key and a policy allowing s3:* but the `deny` actions), with
/// bucket `data` and multipart uploads opened with no record, as a kill leaves them, for
/// `out/00000.parquet`, `out/00001.parquet`, `out/notes.parquet` and `elsewhere/00000.parquet`.
/// Returns the server, the key id and its secret.
fn signed_moto(deny: &[&str]) -> (Moto, String, String) {
    let m = start_moto(Some(3));
    // boto3 comes with moto.
    let script = r#"
import boto3, json, sys
e, deny = sys.argv[1], [a for a in sys.argv[2].split(",") if a]
iam = boto3.client("iam", endpoint_url=e, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
iam.create_user(UserName="recap")
k = iam.create_access_key(UserName="recap")["AccessKey"]
statements = [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}] + ([{"Effect": "Deny", "Action": deny, "Resource": "*"}] if deny else [])
iam.put_user_policy(UserName="recap", PolicyName="s3", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
s3 = boto3.client("s3", endpoint_url=e, region_name="us-east-1", aws_access_key_id=k["AccessKeyId"], aws_secret_access_key=k["SecretAccessKey"])
s3.create_bucket(Bucket="data")
for key in ["out/00000.parquet", "out/00001.parquet", "out/notes.parquet", "elsewhere/00000.parquet"]:
    s3.create_multipart_upload(Bucket="data", Key=key)
print(k["AccessKeyId"], k["SecretAccessKey"])
"#;
    let out = Command::new(python()).args(["-c", script, &m.endpoint, &deny.join(",")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (key, secret) = text.trim().split_once(' ').unwrap();
    (m, key.to_string(), secret.to_string())
}

/// A 20-row world in, `s3://data/out` out (shards of 10 rows) on a signed_moto denying `deny`:
/// the pipeline, and the output opened with the same key.
struct SignedRun {
    _world: World,
    _tmp: tempfile::TempDir,
    staging: tempfile::TempDir,
    _moto: Moto,
    pipeline: PathBuf,
    out: Remote,
}

async fn signed_run(deny: &'static [&'static str]) -> SignedRun {
    let w = world(20, 0, "", ServeOptions::default()).await;
    let (tmp, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (moto, key, secret) = tokio::task::spawn_blocking(move || signed_moto(deny)).await.unwrap();
    let yaml = storage_yaml(&moto, &key, "16MB").replace("aws_secret_access_key: secret", &format!("aws_secret_access_key: \"{secret}\""));
    let pipeline = write_pipeline(tmp.path(), &w.urls.display().to_string(), "s3://data/out", 10, 4, &yaml);
    let mut st = storage(&moto, &key);
    st.options.insert("aws_secret_access_key".into(), secret);
    let out = Remote::open("s3://data/out", &st).unwrap();
    SignedRun { _world: w, _tmp: tmp, staging, _moto: moto, pipeline, out }
}

/// A kill can land after the store opened a multipart upload and before recap recorded its id.
/// A rerun finds such uploads by asking the store (ListMultipartUploads, signed: this moto checks
/// every signature against an IAM key) and aborts those of its own shards only: another worker's
/// upload, possibly in flight, and objects that are not shards stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecorded_uploads_are_aborted_for_the_workers_own_shards_only() {
    let r = signed_run(&[]).await;
    let (out, p, staging_path) = (r.out.clone(), r.pipeline.clone(), r.staging.path().to_path_buf());
    let open = |o: &Remote| {
        let o = o.clone();
        blocking(async move { o.open_uploads().await.unwrap().into_iter().map(|(n, _)| n).collect::<BTreeSet<String>>() })
    };
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
    let (o, sp, p2) = (out.clone(), staging_path.clone(), p.clone());
    let (before, run0, after0) = tokio::task::spawn_blocking(move || {
        let before = open(&o);
        let run0 = recap(&["run", p2.to_str().unwrap(), "--no-progress", "--worker", "0/2"], &sp);
        (before, run0, open(&o))
    })
    .await
    .unwrap();
    assert_eq!(before, names(&["00000.parquet", "00001.parquet", "notes.parquet"]), "listed under the prefix only");
    let err0 = String::from_utf8_lossy(&run0.stderr).to_string();
    assert!(run0.status.success(), "{err0}");
    assert!(err0.contains("aborted a multipart upload") && err0.contains("00000.parquet"), "{err0}");
    assert_eq!(after0, names(&["00001.parquet", "notes.parquet"]), "worker 0 leaves worker 1's shard and the non-shard alone");
    let (o, sp, p2) = (out.clone(), staging_path.clone(), p.clone());
    let (run1, after1, done) = tokio::task::spawn_blocking(move || {
        let run1 = recap(&["run", p2.to_str().unwrap(), "--no-progress", "--worker", "1/2"], &sp);
        let after1 = open(&o);
        let done = committed_ids(&o);
        (run1, after1, done)
    })
    .await
    .unwrap();
    assert!(run1.status.success(), "{}", String::from_utf8_lossy(&run1.stderr));
    assert_eq!(after1, names(&["notes.parquet"]));
    let (shards, mut ids) = done;
    ids.sort();
    assert_eq!(shards, BTreeSet::from([0, 1]));
    assert_eq!(ids, (0..20).collect::<Vec<u64>>());
    drop(r);
}

/// The listing is a safety net: a key that may write shards but not list open uploads
/// (s3:ListBucketMultipartUploads denied) still runs, and says what it could not clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_cannot_list_uploads_runs_with_a_warning() {
    let r = signed_run(&["s3:ListBucketMultipartUploads"]).await;
    let (out, p, staging_path) = (r.out.clone(), r.pipeline.clone(), r.staging.path().to_path_buf());
    let (run, listed, done) = tokio::task::spawn_blocking(move || {
        let run = recap(&["run", p.to_str().unwrap(), "--no-progress"], &staging_path);
        let o = out.clone();
        let listed = blocking(async move { o.open_uploads().await.map(|_| ()).map_err(|e| e.to_string()) });
        (run, listed, committed_ids(&out))
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "{err}");
    assert!(err.contains("cannot list the open multipart uploads of s3://data/out") && err.contains("AccessDenied"), "{err}");
    assert!(err.contains("the key's policy does not allow this request") && err.contains("stay open"), "{err}");
    assert!(listed.unwrap_err().contains("AccessDenied"), "the store refuses this key the listing");
    assert_eq!(done.0, BTreeSet::from([0, 1]));
    assert_eq!(done.1.len(), 20);
    drop(r);
}

/// A credential the server does not know is a clear error, not a hang or a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_credential_is_a_clear_error() {
    let w = world(10, 0, "", ServeOptions::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let tmp_path = tmp.path().to_path_buf();
    let m = tokio::task::spawn_blocking(|| start_moto(Some(0))).await.unwrap();
    let p = write_pipeline(&tmp_path, &w.urls.display().to_string(), "s3://data/run", 10, 16, &storage_yaml(&m, "AKIAWRONGKEY", "16MB"));
    let out = tokio::task::spawn_blocking(move || recap(&["run", p.to_str().unwrap(), "--no-progress"], &tmp_path)).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("s3://data/run") && err.contains("the credentials were refused"), "{err}");
    drop(m);
}

/// `recap train` reads its shards from the same URLs: the committed reinforced test shards,
/// uploaded with their markers, train a tiny student for two steps.
#[test]
fn training_reads_shards_from_s3() {
    let m = start_moto(None);
    create_bucket(&m, "data");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let remote = Remote::open("s3://data/reinforced", &storage(&m, "test")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let r = remote.clone();
    let src = root.join("tests/data/shards");
    let t = tmp.path().to_path_buf();
    blocking(async move {
        for i in 0..2 {
            let name = format!("{i:05}");
            r.upload_file(&src.join(format!("{name}.parquet")), &format!("{name}.parquet")).await.unwrap();
            r.upload_file(&src.join(format!("{name}.stats.json")), &format!("{name}.stats.json")).await.unwrap();
            let marker = t.join("m.json");
            std::fs::write(&marker, br#"{"rows": 20, "config_hash": "test"}"#).unwrap();
            r.upload_file(&marker, &format!("{name}.done")).await.unwrap();
        }
    });
    let out = tmp.path().join("run");
    let run = Command::new(env!("CARGO_BIN_EXE_recap"))
        .current_dir(root)
        .args(["train", "pipelines/train-tiny.yaml", "--set", "data.shards=s3://data/reinforced", "--set"])
        .arg(format!("output.dir={}", out.display()))
        .args(["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "data.shuffle_buffer=16"])
        .env("RECAP_STAGING", tmp.path())
        .envs([("AWS_ENDPOINT_URL", m.endpoint.as_str()), ("AWS_ALLOW_HTTP", "true"), ("AWS_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "secret")])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 1 && metrics.contains("\"step\":2"), "{metrics}");
    // The student evaluated on an evaluation set in the bucket (a small world's eval.parquet).
    let world = tmp.path().join("world");
    let spec = recap::synth::WorldSpec { count: 12, seed: 3, min_size: (64, 48), max_size: (96, 72), ..Default::default() };
    recap::synth::generate(&world, &spec).unwrap();
    let evals = Remote::open("s3://data/eval", &storage(&m, "test")).unwrap();
    let w = world.clone();
    blocking(async move { evals.upload_file(&w.join("eval.parquet"), "eval.parquet").await.unwrap() });
    let eval = Command::new(env!("CARGO_BIN_EXE_recap"))
        .args(["eval", "--model", out.join("model").to_str().unwrap(), "--data", "s3://data/eval/eval.parquet", "--json"])
        .env("RECAP_STAGING", tmp.path())
        .envs([("AWS_ENDPOINT_URL", m.endpoint.as_str()), ("AWS_ALLOW_HTTP", "true"), ("AWS_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "secret")])
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    let local = recap::train::eval::EvalSet::open(&world.join("eval.parquet")).unwrap();
    assert_eq!(report["data"], "s3://data/eval/eval.parquet");
    assert_eq!(report["images"], local.images.len(), "{report}");
}

/// Azurite's development account and key: published, the same in every Azurite (not a secret).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

struct Azurite {
    _server: Server,
    port: u16,
    /// The account's URL, as a real account's `https://ACCOUNT.blob.core.windows.net`.
    endpoint: String,
    _dir: tempfile::TempDir,
}

/// Azurite's blob service on a free port, in memory, checking every request's Shared Key
/// signature, with `containers` made through the Azure SDK for Python.
fn start_azurite(containers: &[&str]) -> Azurite {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/azurite/node_modules/.bin/azurite-blob");
    assert!(bin.is_file(), "{} is missing: run scripts/azurite-env.sh (installs Azurite from npm)", bin.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Its working directory: Azurite writes its debug log there (--location does not go with
    // --inMemoryPersistence), with every request it served (`Azurite::requests`).
    // --skipApiVersionCheck: the Python SDK speaks a newer API version than this Azurite knows.
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("stderr.txt");
    let mut cmd = Command::new(bin);
    cmd.args(["--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck", "--debug", "debug.log"])
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let server = start_server(cmd, port, "Azurite", Some(&stderr));
    let a = Azurite { _server: server, port, endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"), _dir: dir };
    for c in containers {
        azure_sdk(&a, "create", c);
    }
    a
}

impl Azurite {
    /// The requests Azurite has served so far, as `METHOD URL` (from its debug log).
    fn requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self._dir.path().join("debug.log")).unwrap();
        log.lines()
            .filter_map(|l| {
                let method = l.split("RequestMethod=").nth(1)?.split(' ').next()?;
                let url = l.split("RequestURL=").nth(1)?.split(' ').next()?;
                Some(format!("{method} {url}"))
            })
            .collect()
    }
}

/// The Azure SDK for Python on `a`'s container: `create` makes it; `uncommitted` prints the blobs
/// that hold uncommitted blocks (a block upload not committed), one per line.
fn azure_sdk(a: &Azurite, op: &str, container: &str) -> String {
    let script = r#"
import sys
from azure.storage.blob import BlobServiceClient
endpoint, account, key, op, container = sys.argv[1:6]
conn = f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};BlobEndpoint={endpoint};"
c = BlobServiceClient.from_connection_string(conn).get_container_client(container)
if op == "create":
    c.create_container()
else:
    for b in c.list_blobs(include=["uncommittedblobs"]):
        if c.get_blob_client(b.name).get_block_list("uncommitted")[1]:
            print(b.name)
"#;
    let out = Command::new(python()).args(["-c", script, &a.endpoint, AZURITE_ACCOUNT, AZURITE_KEY, op, container]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn azure_options(a: &Azurite, key: &str) -> [(&'static str, String); 4] {
    [
        ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
        ("azure_storage_account_key", key.to_string()),
        ("azure_storage_endpoint", a.endpoint.clone()),
        ("azure_allow_http", "true".to_string()),
    ]
}

fn azure_storage(a: &Azurite) -> StorageConfig {
    let mut s = StorageConfig::default();
    for (k, v) in azure_options(a, AZURITE_KEY) {
        s.options.insert(k.into(), v);
    }
    s
}

fn azure_storage_yaml(a: &Azurite, key: &str, threshold: &str) -> String {
    let options: String = azure_options(a, key).iter().map(|(k, v)| format!("    {k}: \"{v}\"\n")).collect();
    format!("storage:\n  multipart_threshold: {threshold}\n  part_size: 5MiB\n  options:\n{options}")
}

/// Azurite on a blocking thread with container `data`, and the world's URL list uploaded to
/// `az://data/lists/urls.parquet`.
async fn azurite_with_list(w: &World) -> Azurite {
    let urls = w.urls.clone();
    tokio::task::spawn_blocking(move || {
        let a = start_azurite(&["data"]);
        let lists = Remote::open("az://data/lists", &azure_storage(&a)).unwrap();
        blocking(async move { lists.upload_file(&urls, "urls.parquet").await.unwrap() });
        a
    })
    .await
    .unwrap()
}

/// The same run on Azure Blob Storage: the URL list read from a container, shards written to it
/// with every Parquet file a block upload (Put Block, then Put Block List), nothing left
/// uncommitted, a rerun that writes nothing, and `recap query` reading the container with the
/// credentials from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reads_and_writes_azure_blob_storage_and_resumes() {
    let w = world(40, 0, "", ServeOptions::default()).await;
    let (tmp, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = azurite_with_list(&w).await;
    let p = write_pipeline(tmp.path(), "az://data/lists/urls.parquet", "az://data/run", 20, 16, &azure_storage_yaml(&a, AZURITE_KEY, "1KB"));
    let out = Remote::open("az://data/run", &azure_storage(&a)).unwrap();
    let sp = staging.path().to_path_buf();
    let (a, first, again, uncommitted, names, (done, mut ids), query) = tokio::task::spawn_blocking(move || {
        let first = recap(&["run", p.to_str().unwrap(), "--no-progress"], &sp);
        let again = recap(&["run", p.to_str().unwrap(), "--no-progress"], &sp);
        let o = out.clone();
        let names: Vec<String> = blocking(async move { o.list_names().await.unwrap() }).into_iter().map(|(n, _)| n).collect();
        // A reader takes the same URL, with the account from the environment as a user's shell has it.
        let query = Command::new(env!("CARGO_BIN_EXE_recap"))
            .args(["query", "--shards", "az://data/run", "--format", "csv", "SELECT count(*) AS n, count(DISTINCT id) AS ids, count(*) FILTER (WHERE status = 'ok') AS ok FROM shards"])
            .env("RECAP_STAGING", &sp)
            .envs(azure_options(&a, AZURITE_KEY).map(|(k, v)| (k.to_uppercase(), v)))
            .output()
            .unwrap();
        let uncommitted = azure_sdk(&a, "uncommitted", "data");
        (a, first, again, uncommitted, names, committed_ids(&out), query)
    })
    .await
    .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("2 written") && stdout.contains("az://data/run"), "{stdout}");
    assert_eq!(done, BTreeSet::from([0, 1]));
    ids.sort();
    assert_eq!(ids, (0..40).collect::<Vec<u64>>(), "every row once");
    assert_eq!(uncommitted, "", "no blob holds uncommitted blocks");
    assert!(names.contains(&"00000.parquet".to_string()) && !names.iter().any(|n| n.ends_with(".upload")), "{names:?}");
    // Each shard's Parquet went up in blocks, and no `.upload` record was written for it: on
    // Azure a cut upload's blocks are discarded by the next commit of the name, with nothing to
    // abort.
    let requests = a.requests();
    for shard in ["00000", "00001"] {
        let blob = format!("/data/run/{shard}.parquet?");
        let put_block = |r: &&String| r.starts_with("PUT ") && r.contains(&blob) && r.contains("comp=block") && !r.contains("comp=blocklist");
        assert!(requests.iter().any(|r| put_block(&r)), "no Put Block for shard {shard}: {requests:?}");
    }
    assert!(!requests.iter().any(|r| r.contains(".upload")), "{:?}", requests.iter().filter(|r| r.contains(".upload")).collect::<Vec<_>>());
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 written, 2 already complete (skipped)"), "{}", String::from_utf8_lossy(&again.stdout));
    assert!(query.status.success(), "{}", String::from_utf8_lossy(&query.stderr));
    assert_eq!(String::from_utf8_lossy(&query.stdout).trim(), "n,ids,ok\n40,40,40");
    drop((a, tmp, w));
}

/// Runs killed with SIGKILL mid-run on Azure, then resumed: every shard committed once, every row
/// once, and no blob left holding the uncommitted blocks of a cut upload (Azure has no abort: a
/// shard's rewrite commits its new block list, which discards them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_runs_killed_mid_upload_resume_to_every_row_once() {
    let w = world(120, 0, "", ServeOptions { latency: Duration::from_millis(100), ..ServeOptions::default() }).await;
    let (tmp, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = azurite_with_list(&w).await;
    let p = write_pipeline(tmp.path(), "az://data/lists/urls.parquet", "az://data/killed", 10, 4, &azure_storage_yaml(&a, AZURITE_KEY, "1KB"));
    let out = Remote::open("az://data/killed", &azure_storage(&a)).unwrap();
    kill_and_resume(p, staging.path().to_path_buf(), out).await;
    let uncommitted = tokio::task::spawn_blocking(move || azure_sdk(&a, "uncommitted", "data")).await.unwrap();
    assert_eq!(uncommitted, "", "no blob holds uncommitted blocks");
}

/// A wrong account key and a container that does not exist are clear errors in Azure's terms
/// (exit 2), with the store's code and message, not its XML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_azure_key_or_a_missing_container_is_a_clear_error() {
    let w = world(10, 0, "", ServeOptions::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let a = tokio::task::spawn_blocking(|| start_azurite(&["data"])).await.unwrap();
    // Valid base64, not the account's key: every request's signature is refused.
    let wrong = write_pipeline(tmp.path(), &w.urls.display().to_string(), "az://data/run", 10, 16, &azure_storage_yaml(&a, "bm90IHRoZSBhY2NvdW50J3Mga2V5", "16MB"));
    std::fs::rename(&wrong, tmp.path().join("wrong.yaml")).unwrap();
    let missing = write_pipeline(tmp.path(), &w.urls.display().to_string(), "az://nosuch/run", 10, 16, &azure_storage_yaml(&a, AZURITE_KEY, "16MB"));
    let t = tmp.path().to_path_buf();
    let (wrong, missing) = tokio::task::spawn_blocking(move || {
        let wrong = recap(&["run", t.join("wrong.yaml").to_str().unwrap(), "--no-progress"], &t);
        let missing = recap(&["run", missing.to_str().unwrap(), "--no-progress"], &t);
        drop(a);
        (wrong, missing)
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&wrong.stderr).to_string();
    assert_eq!(wrong.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("az://data/run") && err.contains("403 Forbidden: AuthorizationFailure: Server failed to authenticate the request"), "{err}");
    assert!(err.contains("the credentials were refused: check AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY"), "{err}");
    assert!(!err.contains("<?xml") && !err.contains("AWS_"), "{err}");
    let err = String::from_utf8_lossy(&missing.stderr).to_string();
    assert_eq!(missing.status.code(), Some(2), "a usage error: {err}");
    assert!(err.contains("az://nosuch/run") && err.contains("ContainerNotFound: The specified container does not exist. (no such container)"), "{err}");
}

/// A loopback TCP proxy to `upstream` that cuts every `nth` connection with a reset (SO_LINGER 0)
/// once the client has sent its first bytes, as a server closing a connection under a request
/// does, and relays the others. Returns its port and the count of connections cut.
async fn resetting_proxy(upstream: u16, nth: usize) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = cut.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        while let Ok((mut client, _)) = listener.accept().await {
            n += 1;
            let counter = counter.clone();
            tokio::spawn(async move {
                if n.is_multiple_of(nth) {
                    let mut buf = [0u8; 4096];
                    let _ = client.read(&mut buf).await;
                    let _ = client.set_zero_linger();
                    counter.fetch_add(1, SeqCst);
                } else if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (port, cut)
}

/// Every third connection to the store is reset under its request (no pooled connections, so
/// each request has its own): reads are resent by object_store, writes (PUT of a block, a block
/// list, a marker; DELETE) by recap, and the run commits every shard with every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_cut_by_a_connection_reset_are_sent_again() {
    let w = world(40, 0, "", ServeOptions::default()).await;
    let (tmp, staging) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = azurite_with_list(&w).await;
    let (proxy, cut) = resetting_proxy(a.port, 3).await;
    let yaml = azure_storage_yaml(&a, AZURITE_KEY, "1KB").replace(&a.endpoint, &format!("http://127.0.0.1:{proxy}/{AZURITE_ACCOUNT}")) + "    pool_max_idle_per_host: \"0\"\n";
    let p = write_pipeline(tmp.path(), "az://data/lists/urls.parquet", "az://data/cut", 10, 16, &yaml);
    let out = Remote::open("az://data/cut", &azure_storage(&a)).unwrap();
    let sp = staging.path().to_path_buf();
    let (run, (done, mut ids)) = tokio::task::spawn_blocking(move || {
        let run = recap(&["run", p.to_str().unwrap(), "--no-progress"], &sp);
        (run, committed_ids(&out))
    })
    .await
    .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let cut = cut.load(std::sync::atomic::Ordering::SeqCst);
    assert!(cut >= 5, "the proxy cut {cut} connections");
    assert_eq!(done, (0..4).collect::<BTreeSet<u64>>());
    ids.sort();
    assert_eq!(ids, (0..40).collect::<Vec<u64>>(), "every row once after {cut} connections were cut");
    drop((a, tmp, w));
}
