//! Input lists and shards in an S3 bucket, against a real S3-protocol server: moto's
//! (`moto_server`, PyPI `moto[server]`, installed in .venv by scripts/python-env.sh), started by
//! each test on a free loopback port. The recap binary runs as a user runs it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use recap::config::StorageConfig;
use recap::storage::{blocking, Remote};
use recap::synth::ServeOptions;

struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_server() -> PathBuf {
    let python = std::env::var("RECAP_PYTHON").unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python").display().to_string());
    let bin = Path::new(&python).with_file_name("moto_server");
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
    let child = cmd.spawn().expect("moto_server starts");
    let endpoint = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "moto_server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Moto { child, endpoint }
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
    blocking(async move {
        let done = r.completed().await.unwrap();
        let mut ids = Vec::new();
        for s in &done {
            let bytes = r.get(&r.child(&format!("{s:05}.parquet"))).await.unwrap();
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes).unwrap().build().unwrap();
            for b in reader {
                let b = b.unwrap();
                ids.extend(u64s(&b, "id"));
            }
        }
        (done.into_iter().collect(), ids)
    })
}

fn write_pipeline(dir: &Path, input: &str, output: &str, rows_per_shard: u64, concurrency: u32, storage: &str) -> PathBuf {
    let text = format!(
        "input:\n  path: {input}\n  passthrough: [id]\n  rows_per_shard: {rows_per_shard}\ndownload:\n  concurrency: {concurrency}\n  rate_per_host: null\n  allow_private_networks: true\nimage:\n  size: 64\n  min_size: 1\noutput:\n  path: {output}\n{storage}"
    );
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, text).unwrap();
    p
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
    let q = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_recap"))
            .args(["query", "--shards", "s3://data/run", "--format", "csv", "SELECT count(*) AS n, count(DISTINCT id) AS ids, count(*) FILTER (WHERE status = 'ok') AS ok FROM shards"])
            .env("RECAP_STAGING", &sp)
            .envs([("AWS_ENDPOINT_URL", endpoint.as_str()), ("AWS_ALLOW_HTTP", "true"), ("AWS_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "secret")])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    assert_eq!(String::from_utf8_lossy(&q.stdout).trim(), "n,ids,ok\n60,60,60", "the three committed shards, not the stray file");
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
    let p2 = p.clone();
    let sp = staging_path.clone();
    let last = tokio::task::spawn_blocking(move || recap(&["run", p2.to_str().unwrap(), "--no-progress"], &sp)).await.unwrap();
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
    let o = out.clone();
    let (done, mut ids) = tokio::task::spawn_blocking(move || committed_ids(&o)).await.unwrap();
    assert_eq!(done, (0..12).collect::<BTreeSet<u64>>());
    ids.sort();
    assert_eq!(ids, (0..120).collect::<Vec<u64>>(), "every row once after {kills} kills");
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
    let python = moto_server().with_file_name("python");
    let out = Command::new(python).args(["-c", script, &m.endpoint, &deny.join(",")]).output().unwrap();
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
}
