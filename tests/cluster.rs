//! Distributed SQL (feature `cluster`): a Ballista scheduler and two executors started as
//! `recap cluster ...` processes on loopback; the committed test shards queried through them,
//! recap's functions included (`embed_text` runs the teachers' ONNX towers in the executors), and
//! every result compared with the same statement run locally.
#![cfg(feature = "cluster")]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use recap::query;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shards() -> PathBuf {
    root().join("tests/data/shards")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The cluster's processes, killed when the test ends however it ends.
struct Procs(Vec<(String, Child, PathBuf)>);

impl Procs {
    fn spawn(&mut self, name: &str, args: &[&str], logs: &Path) {
        let log = logs.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_recap"))
            .args(args)
            .current_dir(root())
            .env("RECAP_LOG", "info")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.0.push((name.to_string(), child, log));
    }

    /// Every process still running (a scheduler or executor that exited is a failure).
    fn check_alive(&mut self) {
        for (name, child, log) in &mut self.0 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{name} exited ({status}):\n{}", std::fs::read_to_string(log).unwrap_or_default());
            }
        }
    }

    fn log(&self, name: &str) -> String {
        let (_, _, log) = self.0.iter().find(|p| p.0 == name).unwrap();
        std::fs::read_to_string(log).unwrap_or_default()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A result as text, for comparing: the table display, which shows every value of plain
/// columns and a summary of embedding columns.
fn text(r: &query::QueryResult) -> String {
    query::format_table(&r.batches, &r.schema).unwrap()
}

#[test]
fn queries_on_a_ballista_cluster_equal_local_results() {
    std::env::set_current_dir(root()).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut procs = Procs(Vec::new());
    let sched = format!("127.0.0.1:{}", free_port());
    procs.spawn("scheduler", &["cluster", "scheduler", "--bind", &sched], logs.path());
    for name in ["executor-1", "executor-2"] {
        let (flight, grpc) = (format!("127.0.0.1:{}", free_port()), free_port().to_string());
        let work = logs.path().join(name);
        std::fs::create_dir_all(&work).unwrap();
        let w = work.display().to_string();
        let args = ["cluster", "executor", "--scheduler", &sched, "--bind", &flight, "--grpc-port", &grpc, "--concurrent-tasks", "2", "--work-dir", &w];
        procs.spawn(name, &args, logs.path());
    }
    let url = format!("df://{sched}");

    let queries = [
        "SELECT status, count(*) AS n FROM shards GROUP BY status ORDER BY n DESC, status",
        "SELECT shard, rows, ok, filtered, http_error, decode_failed FROM stats ORDER BY shard",
        "SELECT t.shard, count(*) AS n, max(t.rows) AS rows, sum(CASE WHEN s.status = 'ok' THEN 1 ELSE 0 END) = max(t.ok) AS ok_agrees \
         FROM shards s JOIN stats t ON substr(s.key, 1, 5) = lpad(CAST(t.shard AS VARCHAR), 5, '0') GROUP BY t.shard ORDER BY t.shard",
        "SELECT status, count(*) AS n, round(avg(clip_score), 3) AS alt_text, round(avg(array_max(synthetic_clip_scores)), 3) AS best_synthetic \
         FROM shards WHERE clip_score IS NOT NULL GROUP BY status ORDER BY status",
        "SELECT a.key AS a, b.key AS b, hamming(a.phash, b.phash) AS bits FROM shards a JOIN shards b \
         ON a.key < b.key WHERE hamming(a.phash, b.phash) <= 6 ORDER BY a.key, b.key",
        "SELECT key, dims(image_embeddings) AS views, dims(view(image_embeddings, 0)) AS d, \
         round(cosine_sim(view(image_embeddings, 0), caption_embedding(text_embeddings, 0)), 4) AS alt_cos, \
         round(l2_norm(teacher(view(image_embeddings, 0), 'shapeworld-clip-b')), 3) AS norm_b FROM shards WHERE status = 'ok' ORDER BY key",
        "SELECT key, round(cosine_sim(embed_text('a red circle'), view(image_embeddings, 0)), 3) AS to_text, \
         round(cosine_sim(embed_text(caption), caption_embedding(text_embeddings, 0)), 3) AS same \
         FROM shards WHERE status = 'ok' ORDER BY to_text DESC, key LIMIT 5",
        "SELECT key, view(image_embeddings, 0) AS v FROM shards WHERE status = 'ok' ORDER BY key LIMIT 3",
    ];

    let rt = rt();
    let (local, _) = rt.block_on(query::session(&shards())).unwrap();
    let (remote, _) = rt.block_on(query::cluster::session(&shards(), &url)).unwrap();

    // The executors register shortly after they start: the first statement is retried until
    // the cluster answers (a minute at most).
    let t = Instant::now();
    let first = loop {
        procs.check_alive();
        match rt.block_on(query::execute(&remote, queries[0])) {
            Ok(r) => break r,
            Err(e) if t.elapsed() < Duration::from_secs(60) => {
                eprintln!("cluster not ready yet: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("the cluster never answered: {e}\nscheduler log:\n{}", procs.log("scheduler")),
        }
    };
    let expected = text(&rt.block_on(query::execute(&local, queries[0])).unwrap());
    assert_eq!(text(&first), expected);
    assert!(expected.contains("ok"), "{expected}");

    for q in &queries[1..] {
        let want = rt.block_on(query::execute(&local, q)).unwrap_or_else(|e| panic!("locally: {q}: {e}"));
        let got = rt.block_on(query::execute(&remote, q)).unwrap_or_else(|e| {
            panic!("on the cluster: {q}: {e}\nexecutor-1 log:\n{}\nexecutor-2 log:\n{}", procs.log("executor-1"), procs.log("executor-2"))
        });
        assert!(want.batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0, "{q} returns no rows: a weak comparison");
        assert_eq!(got.schema.fields().len(), want.schema.fields().len(), "{q}");
        assert_eq!(text(&got), text(&want), "{q}");
    }

    // The command line: the same CSV from `recap query` and `recap query --cluster`.
    let q = "SELECT key, status, reason, round(clip_score, 4) AS s FROM shards ORDER BY key";
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_recap"))
            .current_dir(root())
            .args(["query", "--shards"])
            .arg(shards())
            .args(["--format", "csv"])
            .args(extra)
            .arg(q)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let (l, c) = (run(&[]), run(&["--cluster", &url]));
    assert!(l.lines().count() > 10, "{l}");
    assert_eq!(c, l);
    // The shell's backslash commands and a statement, from a pipe: the same answers.
    let script = |extra: &[&str]| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_recap"))
            .current_dir(root())
            .args(["query", "--shards"])
            .arg(shards())
            .args(["--format", "csv"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"\\d\n\\d shards\n\\d stats\nSELECT count(*) AS n FROM stats;\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let (l, c) = (script(&[]), script(&["--cluster", &url]));
    assert!(l.contains("image_embeddings") && l.contains("config_hash") && l.contains("\nn\n"), "{l}");
    assert_eq!(c, l);

    // Both executors ran tasks.
    procs.check_alive();
    for name in ["executor-1", "executor-2"] {
        let log = procs.log(name);
        assert!(log.contains("Finished task"), "{name} ran no task:\n{log}");
    }
}

/// No scheduler at the address: a clear error, soon, not a hang.
#[test]
fn no_scheduler_is_a_clear_error() {
    let port = free_port();
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_recap"))
        .current_dir(root())
        .args(["query", "--shards"])
        .arg(shards())
        .args(["--cluster", &format!("df://127.0.0.1:{port}"), "SELECT count(*) FROM shards"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("cannot reach the Ballista scheduler at df://127.0.0.1:{port}")), "{err}");
    assert!(err.contains("connection refused"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60), "took {:?}", t.elapsed());

    let out = Command::new(env!("CARGO_BIN_EXE_recap")).args(["query", "--cluster", "http://x/", "SELECT 1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("df://HOST:PORT"));
}
