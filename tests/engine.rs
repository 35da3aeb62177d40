//! End to end over loopback HTTP: every fault gets its status, rows reconcile, a killed run
//! resumes to the same rows, workers split the shards, retryable failures are retried in place.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
#[cfg(feature = "query")]
use arrow::array::{Array, StringArray, UInt64Array};
use recap::config;
use recap::engine::{self, RunOptions, Worker};
use recap::synth::ServeOptions;

fn expected_status(fault: Option<&str>, corrupt: bool) -> &'static str {
    if corrupt {
        return "decode_failed";
    }
    match fault {
        None | Some("flaky") | Some("429") | Some("wrong_type") | Some("redirect") => "ok",
        Some("404") | Some("500") => "http_error",
        Some("slow") => "timeout",
        Some("reset") | Some("truncated") => "download_failed",
        Some("not_image") => "decode_failed",
        Some("redirect_loop") => "too_many_redirects",
        Some("oversized") | Some("oversized_chunked") => "too_large",
        Some("bomb") => "too_many_pixels",
        Some("opt_out") => "opted_out",
        Some(other) => panic!("no expectation for fault {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_kind_gets_its_status_and_rows_reconcile() {
    let faults = recap::synth::FAULTS.iter().map(|f| format!("{f}=2")).collect::<Vec<_>>().join(",");
    let opts = ServeOptions { slow_delay: Duration::from_secs(3), oversized_bytes: 2_000_000, bomb_side: 5000, ..Default::default() };
    let w = world(50, 3, &faults, opts).await;
    let out = w.tmp.path().join("out");
    let p = pipeline(&w, &out, 20, "", "  max_pixels: 10000000");
    let plan = config::load(&p, &[]).unwrap();
    let summary = engine::run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(summary.rows, 50);
    assert_eq!(summary.shards_written, vec![0, 1, 2]);

    let samples = recap::synth::load_samples(&w.dir).unwrap();
    let mut rows = 0;
    for (shard, b) in read_all(&out) {
        let ids = u64s(&b, "id");
        let faults = strings(&b, "fault");
        let status = strings(&b, "status");
        let reason = strings(&b, "reason");
        let keys = strings(&b, "key");
        for i in 0..b.num_rows() {
            let id = ids[i];
            // Input order is kept: row i of shard s is input row s*20+i.
            assert_eq!(id, shard * 20 + i as u64);
            assert_eq!(keys[i].as_deref().unwrap(), format!("{shard:05}{i:04}"));
            let want = expected_status(faults[i].as_deref(), samples[id as usize].corrupt);
            assert_eq!(status[i].as_deref().unwrap(), want, "row {id} fault {:?}: reason {:?}", faults[i], reason[i]);
            assert_eq!(reason[i].is_none(), want == "ok", "row {id}: ok rows and only they have no reason");
            rows += 1;
        }
        let stats: recap::sink::ShardStats =
            serde_json::from_slice(&std::fs::read(out.join(format!("{shard:05}.stats.json"))).unwrap()).unwrap();
        assert_eq!(stats.rows, b.num_rows() as u64);
        assert_eq!(stats.status.values().sum::<u64>(), stats.rows);
        assert!(out.join(format!("{shard:05}.done")).is_file());
    }
    assert_eq!(rows, 50, "rows in == rows out");
    let http = count_status(&out);
    assert_eq!(summary.status, http);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_are_rows_not_errors_and_private_targets_are_blocked() {
    let w = world(4, 0, "", ServeOptions::default()).await;
    let port = w.server.addr.port();
    let csv = w.tmp.path().join("urls.csv.gz");
    let rows = [
        ("", "empty"),
        ("not a url", "garbage"),
        ("ftp://example.org/a.jpg", "ftp"),
        ("http://127.0.0.1:1/a.jpg", "refused"),
        (&*format!("http://127.0.0.1:{port}/img/000000.jpg"), "loopback literal"),
        (&*format!("http://localhost:{port}/img/000001.jpg"), "loopback name"),
        ("http://[::1]:1/a.jpg", "v6 loopback"),
    ];
    {
        use std::io::Write;
        let f = std::fs::File::create(&csv).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        writeln!(gz, "url,caption").unwrap();
        for (u, c) in rows {
            writeln!(gz, "\"{u}\",{c}").unwrap();
        }
        gz.finish().unwrap();
    }
    let out = w.tmp.path().join("out");
    let yaml = format!("input:\n  path: {}\noutput:\n  path: {}\ndownload:\n  retries: 0\n  timeout: 2s\nimage:\n  min_size: 16\n", csv.display(), out.display());
    let cfg = config::parse_str(&yaml, "t.yaml", &[]).unwrap();
    let plan = config::plan(cfg, "t.yaml").unwrap();
    engine::run(&plan, &RunOptions::default()).await.unwrap();
    let st = fingerprint(&out).into_iter().map(|r| r.2).collect::<Vec<_>>();
    assert_eq!(st, ["invalid_url", "invalid_url", "invalid_url", "blocked", "blocked", "blocked", "blocked"]);
    // The same list with private targets allowed: the loopback rows download.
    let plan = config::plan(
        config::parse_str(&yaml, "t.yaml", &["download.allow_private_networks=true".into(), format!("output.path={}/b", out.display())]).unwrap(),
        "t.yaml",
    )
    .unwrap();
    engine::run(&plan, &RunOptions::default()).await.unwrap();
    let st = fingerprint(&out.join("b")).into_iter().map(|r| r.2).collect::<Vec<_>>();
    assert_eq!(&st[3..6], ["download_failed", "ok", "ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_cover_every_shard_exactly_once() {
    let w = world(23, 0, "", ServeOptions::default()).await;
    let out = w.tmp.path().join("out");
    let p = pipeline(&w, &out, 3, "", "");
    let plan = config::load(&p, &[]).unwrap();
    let mut seen: Vec<u64> = Vec::new();
    for i in 0..3 {
        let s = engine::run(&plan, &RunOptions { worker: Worker { index: i, count: 3 }, ..Default::default() }).await.unwrap();
        assert!(s.shards_written.iter().all(|sh| sh % 3 == i));
        seen.extend(&s.shards_written);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..8).collect::<Vec<_>>(), "8 shards of 3 rows (the last of 2), each written once");
    assert_eq!(fingerprint(&out).len(), 23);
    // A rerun finds everything complete.
    let again = engine::run(&plan, &RunOptions::default()).await.unwrap();
    assert!(again.shards_written.is_empty());
    assert_eq!(again.shards_skipped.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_failed_redoes_only_retryable_rows_in_place() {
    let w = world(30, 0, "flaky=4,404=2", ServeOptions::default()).await;
    let out = w.tmp.path().join("out");
    let p = pipeline(&w, &out, 10, "", "");
    let first_plan = config::load(&p, &["download.retries=0".into()]).unwrap();
    let first = engine::run(&first_plan, &RunOptions::default()).await.unwrap();
    assert_eq!(first.status.get("http_error"), Some(&6));
    let before = fingerprint(&out);

    // Plain rerun: nothing to do.
    let plan = config::load(&p, &["download.retries=0".into()]).unwrap();
    let rerun = engine::run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(rerun.shards_skipped.len(), 3);

    let retried = engine::run(&plan, &RunOptions { retry_failed: true, ..Default::default() }).await.unwrap();
    assert_eq!(retried.rows_retried, 4, "the 503s are retryable, the 404s are not");
    assert_eq!(retried.rows_recovered, 4);
    let after = fingerprint(&out);
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!((&b.0, &b.1), (&a.0, &a.1), "keys and positions are kept");
        if b.2 == "ok" || a.2 == b.2 {
            assert_eq!(b, a, "rows that were not retried are unchanged");
        } else {
            assert_eq!(a.2, "ok");
        }
    }
    assert_eq!(count_status(&out).get("http_error"), Some(&2));
    let mut retried_total = 0;
    for shard in 0..3 {
        let stats: recap::sink::ShardStats =
            serde_json::from_slice(&std::fs::read(out.join(format!("{shard:05}.stats.json"))).unwrap()).unwrap();
        assert_eq!(stats.status.values().sum::<u64>(), 10);
        retried_total += stats.retried.recovered;
    }
    assert_eq!(retried_total, 4);
}

/// `recap run` throttled to one shard at a time and two requests, so that a test can stop it
/// part-way.
fn slow_run(p: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_recap"));
    c.args(["run", p.to_str().unwrap(), "--no-progress", "--set", "download.concurrency=2", "--set", "download.per_host=2", "--set", "engine.shards_in_flight=1"]);
    c
}

/// How many shards of `dir` carry their completion marker.
fn done_shards(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "done")).count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_way_resumes_to_the_same_rows() {
    let opts = ServeOptions { latency: Duration::from_millis(60), ..Default::default() };
    let w = world(60, 2, "404=3,flaky=2", opts).await;
    let reference = w.tmp.path().join("reference");
    let p_ref = pipeline(&w, &reference, 5, "", "");
    let plan = config::load(&p_ref, &[]).unwrap();
    engine::run(&plan, &RunOptions::default()).await.unwrap();

    let out = w.tmp.path().join("killed");
    let p = pipeline(&w, &out, 5, "", "");
    let exe = env!("CARGO_BIN_EXE_recap");
    let mut child = slow_run(&p).stdout(std::process::Stdio::null()).spawn().unwrap();
    // Wait (bounded) until some but not all shards are complete, then SIGKILL.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if done_shards(&out) >= 3 {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the run ended ({st}) before it could be killed");
        }
        assert!(std::time::Instant::now() < deadline, "no shard completed within 60s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done_before: BTreeSet<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".done"))
        .collect();
    assert!(done_before.len() < 12, "killed before the end");

    let status = std::process::Command::new(exe).args(["run", p.to_str().unwrap(), "--no-progress"]).output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("{} already complete (skipped)", done_before.len())), "{text}");
    assert_eq!(fingerprint(&out), fingerprint(&reference), "same rows as an uninterrupted run");
    // No temporary file is left looking like a shard.
    let names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    let shards = names.iter().filter(|n| n.ends_with(".parquet")).count();
    assert_eq!(shards, 12, "{names:?}");
}

/// Two runs of the same shards on one output undo each other's work (one renames away the
/// other's temporary files, or aborts its uploads): while worker 0/2 runs, a second worker 0/2 is
/// refused and names the first; worker 1/2 runs beside it; once the first has ended, worker 0/2
/// runs again and finds its shards done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_the_same_shards_is_refused_while_the_first_runs() {
    let opts = ServeOptions { latency: Duration::from_millis(60), ..Default::default() };
    let w = world(40, 0, "", opts).await;
    let out = w.tmp.path().join("locked");
    let p = pipeline(&w, &out, 5, "", "");
    let null = std::process::Stdio::null;
    let mut first = slow_run(&p).args(["--worker", "0/2"]).stdout(null()).stderr(null()).spawn().unwrap();
    // The lock file names its holder once the first run holds it.
    let lock = out.join(".recap-worker-0-of-2.lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&lock).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "the first run took no lock within 30s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run = |worker: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_recap")).args(["run", p.to_str().unwrap(), "--no-progress", "--worker", worker]).output().unwrap()
    };
    let second = run("0/2");
    let other = run("1/2");
    let first_ran = first.wait().unwrap();
    assert_eq!(second.status.code(), Some(2), "{}", String::from_utf8_lossy(&second.stderr));
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains(&format!("another recap run (pid {} on ", first.id())) && said.contains("is writing worker 0/2's shards to"), "{said}");
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    assert!(first_ran.success());
    let again = run("0/2");
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 written, 4 already complete (skipped)"), "{}", String::from_utf8_lossy(&again.stdout));
    assert_eq!(done_shards(&out), 8);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_run_says_how_to_resume_and_the_rerun_completes() {
    let opts = ServeOptions { latency: Duration::from_millis(60), ..Default::default() };
    let w = world(40, 0, "404=2", opts).await;
    let out = w.tmp.path().join("terminated");
    let p = pipeline(&w, &out, 5, "", "");
    let child = slow_run(&p).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Once a shard is complete, SIGTERM (what Slurm and Kubernetes send to stop a job).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while done_shards(&out) == 0 {
        assert!(std::time::Instant::now() < deadline, "no shard completed within 60s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by SIGTERM") && err.contains("run the same command again to resume"), "{err}");
    // The same command again finishes the run: every row, once.
    let again = slow_run(&p).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already complete (skipped)"));
    let counts = count_status(&out);
    assert_eq!(counts.values().sum::<u64>(), 40, "{counts:?}");
    assert_eq!(counts.get("http_error"), Some(&2), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_tsv_jsonl_and_parquet_inputs_give_the_same_shards() {
    let w = world(12, 0, "404=2", ServeOptions::default()).await;
    let out = w.tmp.path().join("parquet");
    engine::run(&config::load(&pipeline(&w, &out, 5, "", ""), &[]).unwrap(), &RunOptions::default()).await.unwrap();
    let reference: Vec<(Option<String>, String)> = fingerprint(&out).into_iter().map(|r| (r.1, r.2)).collect();
    // Write the same list as CSV, TSV and JSON Lines (the URL list's url, caption, id, fault).
    let (_, b) = &recap::sink::read_shard(&w.urls).map(|(b, s)| (s, b)).unwrap();
    let urls = strings(b, "url");
    let caps = strings(b, "caption");
    let ids = u64s(b, "id");
    let dir = w.tmp.path().join("lists");
    std::fs::create_dir_all(&dir).unwrap();
    let mut csv = String::from("url,caption,id,fault\n");
    let mut tsv = String::from("url\tcaption\tid\tfault\n");
    let mut jsonl = String::new();
    for i in 0..urls.len() {
        let (u, c) = (urls[i].as_deref().unwrap(), caps[i].as_deref().unwrap());
        csv.push_str(&format!("{u},\"{c}\",{},\n", ids[i]));
        tsv.push_str(&format!("{u}\t{c}\t{}\t\n", ids[i]));
        jsonl.push_str(&format!("{}\n", serde_json::json!({"url": u, "caption": c, "id": ids[i], "fault": null})));
    }
    std::fs::write(dir.join("a.csv"), csv).unwrap();
    std::fs::write(dir.join("a.tsv"), tsv).unwrap();
    std::fs::write(dir.join("a.jsonl"), jsonl).unwrap();
    for name in ["a.csv", "a.tsv", "a.jsonl"] {
        let o = w.tmp.path().join(format!("out-{name}"));
        let p = pipeline(&w, &o, 5, "", "");
        let plan = config::load(&p, &[format!("input.path={}", dir.join(name).display())]).unwrap();
        engine::run(&plan, &RunOptions::default()).await.unwrap();
        let got: Vec<(Option<String>, String)> = fingerprint(&o).into_iter().map(|r| (r.1, r.2)).collect();
        assert_eq!(got, reference, "{name}");
    }
    // A directory of several files is read in name order: 3 copies of the list.
    let o = w.tmp.path().join("out-dir");
    let plan = config::load(&pipeline(&w, &o, 5, "", ""), &[format!("input.path={}", dir.display()), "input.passthrough=[id]".into()]).unwrap();
    let s = engine::run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(s.rows, 36);
}

/// An input list at an http(s) URL is downloaded (query string and all) and gives the shards the
/// local file gives; a rerun keeps the download while the server reports it unchanged and fetches
/// it again once it changed. Schemes recap cannot use are refused by name, not taken for local
/// paths: an output or shard URL over http(s), or an unknown scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_list_is_read_over_http_and_other_schemes_are_refused() {
    let w = world(12, 0, "404=2", ServeOptions::default()).await;
    let out = w.tmp.path().join("local");
    engine::run(&config::load(&pipeline(&w, &out, 5, "", ""), &[]).unwrap(), &RunOptions::default()).await.unwrap();
    let list_url = format!("{}/world/urls.parquet?download=true", w.server.base_url());
    let o = w.tmp.path().join("over-http");
    let p = pipeline(&w, &o, 5, "", "");
    let plan = config::load(&p, &[format!("input.path={list_url}")]).unwrap();
    let s = engine::run(&plan, &RunOptions::default()).await.unwrap();
    assert_eq!(s.rows, 12);
    let rows = |d: &std::path::Path| fingerprint(d).into_iter().map(|r| (r.1, r.2)).collect::<Vec<_>>();
    assert_eq!(rows(&o), rows(&out));
    // The staged copy: kept while unchanged, fetched again once the list changed.
    let staged = recap::storage::stage_http_file(&list_url).unwrap();
    assert_eq!(std::fs::read(&staged).unwrap(), std::fs::read(&w.urls).unwrap());
    let modified = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let first = modified(&staged);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(modified(&recap::storage::stage_http_file(&list_url).unwrap()), first, "an unchanged list is not fetched again");
    recap::synth::write_url_list(&w.dir, &w.server.base_url(), &[], 5).unwrap();
    let again = recap::storage::stage_http_file(&list_url).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&w.urls).unwrap());
    assert_ne!(modified(&again), first, "a changed list is fetched again");
    // A list the server does not have, and schemes recap does not read or write there.
    let missing = format!("{}/world/nothing.parquet", w.server.base_url());
    let e = config::load(&p, &[format!("input.path={missing}")]).err().unwrap().to_string();
    assert!(e.contains("cannot download the input list") && e.contains("HTTP 404"), "{e}");
    let e = config::load(&p, &["input.path=hdfs://namenode/lists/urls.parquet".into()]).err().unwrap().to_string();
    assert!(e.contains("unsupported scheme \"hdfs\"") && e.contains("http(s):// (one file)"), "{e}");
    let e = config::load(&p, &["output.path=https://example.org/shards".into()]).err().unwrap().to_string();
    assert!(e.contains("output.path") && e.contains("an http(s) URL can be read as one input list, not listed or written"), "{e}");
    let e = recap::sink::list_shards("https://example.org/shards").err().unwrap().to_string();
    assert!(e.contains("not listed or written"), "{e}");
}

/// A rerun after rows were appended to the list writes again the completed shard they extend
/// (it was skipped, and its new rows lost, before: 15 of 18 rows came out), and one whose rows
/// were edited; shards whose rows did not change are skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_appended_or_edited_in_the_list_are_not_skipped_on_rerun() {
    let w = world(18, 0, "", ServeOptions::default()).await;
    let (b, _) = recap::sink::read_shard(&w.urls).unwrap();
    let (urls, caps, ids) = (strings(&b, "url"), strings(&b, "caption"), u64s(&b, "id"));
    let row = |i: usize, cap: &str| format!("{},\"{cap}\",{},\n", urls[i].as_deref().unwrap(), ids[i]);
    let list = w.tmp.path().join("list.csv");
    let write = |rows: &[String]| std::fs::write(&list, format!("url,caption,id,fault\n{}", rows.concat())).unwrap();
    let mut rows: Vec<String> = (0..12).map(|i| row(i, caps[i].as_deref().unwrap())).collect();
    write(&rows);
    let out = w.tmp.path().join("grown");
    let p = pipeline(&w, &out, 5, "", "");
    let run = || async { engine::run(&config::load(&p, &[format!("input.path={}", list.display())]).unwrap(), &RunOptions::default()).await.unwrap() };
    let first = run().await;
    assert_eq!((first.rows, first.shards_written.len()), (12, 3));
    // Six rows appended: shard 2 had 2 rows and now has 5; shard 3 is new.
    rows.extend((12..18).map(|i| row(i, caps[i].as_deref().unwrap())));
    write(&rows);
    let second = run().await;
    assert_eq!((second.shards_written.clone(), second.shards_skipped.clone()), (vec![2, 3], vec![0, 1]));
    let full = w.tmp.path().join("full");
    engine::run(&config::load(&pipeline(&w, &full, 5, "", ""), &[]).unwrap(), &RunOptions::default()).await.unwrap();
    let rows_of = |d: &std::path::Path| fingerprint(d).into_iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>();
    assert_eq!(rows_of(&out), rows_of(&full), "every row of the grown list, as a run on it from scratch gives");
    // A caption edited in shard 1: that shard alone is written again, with the new caption.
    rows[7] = row(7, "an edited caption");
    write(&rows);
    let third = run().await;
    assert_eq!((third.shards_written.clone(), third.shards_skipped.len()), (vec![1], 3));
    let captions: Vec<String> = read_all(&out).iter().flat_map(|(_, b)| strings(b, "caption")).flatten().collect();
    assert!(captions.contains(&"an edited caption".to_string()), "{captions:?}");
    assert_eq!(run().await.shards_skipped.len(), 4, "nothing changed since");
    // The list cut to 8 rows: shard 1 is written again with its 3 rows, and shards 2 and 3, now
    // past the input's end, are named (their rows are no longer in the input), not deleted.
    write(&rows[..8]);
    let cut = std::process::Command::new(env!("CARGO_BIN_EXE_recap"))
        .args(["run", p.to_str().unwrap(), "--no-progress", "--set", &format!("input.path={}", list.display())])
        .env("RECAP_LOG", "warn")
        .output()
        .unwrap();
    assert!(cut.status.success(), "{}", String::from_utf8_lossy(&cut.stderr));
    let said = String::from_utf8_lossy(&cut.stderr);
    assert!(said.contains("holds 2 committed shard(s) past the input's 2 (00002 to 00003)"), "{said}");
    assert!(said.contains("it was written from 5 input rows and the input now has 3 there: writing it again"), "{said}");
    assert_eq!(done_shards(&out), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyarrow_and_duckdb_read_the_shards() {
    let python = std::env::var("RECAP_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    assert!(
        std::path::Path::new(&python).exists(),
        "no Python with pyarrow and duckdb at {python}: run `bash scripts/python-env.sh` (scripts/test.sh does)"
    );
    let w = world(30, 2, "404=3,opt_out=2", ServeOptions::default()).await;
    let out = w.tmp.path().join("out");
    let summary = engine::run(&config::load(&pipeline(&w, &out, 8, "", ""), &[]).unwrap(), &RunOptions::default()).await.unwrap();
    let output = std::process::Command::new(&python).arg("tests/interop/count_statuses.py").arg(&out).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let want: serde_json::Value = serde_json::to_value(&summary.status).unwrap();
    assert_eq!(v["pyarrow"], want);
    assert_eq!(v["duckdb"], want);
    let ok = summary.status["ok"];
    assert_eq!(v["pyarrow_images_with_bytes"], ok);
    assert_eq!(v["duckdb_ok_with_hashes"], ok);
    assert_eq!(v["codecs"]["image.bytes"], serde_json::json!(["UNCOMPRESSED"]));
    assert_eq!(v["codecs"]["other"], serde_json::json!(["ZSTD"]));
}

/// `filter: { sql: ... }`: DataFusion evaluates the condition on each shard's rows; ok rows for
/// which it is not true are filtered with the condition as the reason, the others untouched.
#[cfg(feature = "query")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_filter_marks_the_rows_it_rejects() {
    let w = world(24, 1, "404=2", ServeOptions::default()).await;
    let plain = w.tmp.path().join("plain");
    engine::run(&config::load(&pipeline(&w, &plain, 8, "", ""), &[]).unwrap(), &RunOptions::default()).await.unwrap();
    let out = w.tmp.path().join("sql");
    let p = pipeline(&w, &out, 8, "", "");
    let cond = "original_width >= 100 AND id % 3 <> 0";
    std::fs::write(&p, std::fs::read_to_string(&p).unwrap() + &format!("filter:\n  sql: \"{cond}\"\n")).unwrap();
    let s = engine::run(&config::load(&p, &[]).unwrap(), &RunOptions::default()).await.unwrap();
    let rows = |d: &std::path::Path| -> Vec<(u64, String, Option<String>, Option<u32>, bool)> {
        read_all(d)
            .into_iter()
            .flat_map(|(_, b)| {
                let id = b.column_by_name("id").unwrap().as_any().downcast_ref::<UInt64Array>().unwrap().clone();
                let st = b.column_by_name("status").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
                let re = b.column_by_name("reason").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
                let ow = b.column_by_name("original_width").unwrap().as_any().downcast_ref::<arrow::array::UInt32Array>().unwrap().clone();
                let img = b.column_by_name("image").unwrap().clone();
                (0..b.num_rows())
                    .map(|i| (id.value(i), st.value(i).to_string(), re.is_valid(i).then(|| re.value(i).to_string()), ow.is_valid(i).then(|| ow.value(i)), img.is_valid(i)))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (before, after) = (rows(&plain), rows(&out));
    assert_eq!(before.len(), 24);
    let mut filtered = 0;
    for (b, a) in before.iter().zip(&after) {
        let pass = b.3.is_some_and(|w| w >= 100) && b.0 % 3 != 0;
        if b.1 == "ok" && !pass {
            filtered += 1;
            assert_eq!(a.1, "filtered", "{a:?}");
            assert_eq!(a.2.as_deref(), Some(format!("filter.sql: {cond}").as_str()));
            assert!(!a.4, "a filtered row keeps no image");
        } else {
            assert_eq!(a, b);
        }
    }
    assert!(filtered > 0 && s.status.get("filtered").copied() == Some(filtered), "{:?}", s.status);

    // A condition that names no column, or is not a condition, is refused at filter.sql.
    for (bad, want) in [("clip_scor > 0.3", "the shard's columns are: key, uid, url"), ("width + 1", "needs a condition")] {
        std::fs::write(&p, std::fs::read_to_string(pipeline(&w, &out, 8, "", "")).unwrap() + &format!("filter:\n  sql: \"{bad}\"\n")).unwrap();
        let e = engine::run(&config::load(&p, &[]).unwrap(), &RunOptions::default()).await.unwrap_err().to_string();
        assert!(e.contains("filter.sql") && e.contains(want), "{e}");
    }
}

/// A shard is built and encoded a slice of rows at a time (128): a shard of 290 rows (three
/// slices, the last short) must hold exactly what shards of 20 rows hold for the same input rows
/// (status, reason, image bytes), with keys and image paths numbered across the slices, one
/// marker and stats counting every row; under `filter.sql` too, which runs per slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_written_in_slices_holds_what_small_shards_hold() {
    use arrow::array::{Array, BinaryArray, StructArray};
    let w = world(300, 3, "404=4", ServeOptions::default()).await;
    let filter = if cfg!(feature = "query") { "filter:\n  sql: \"id % 7 <> 3\"\n" } else { "" };
    let run = |name: &str, rps: u64| {
        let out = w.tmp.path().join(name);
        let p = pipeline(&w, &out, rps, "", "");
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap() + filter).unwrap();
        (out, p)
    };
    type Row = (String, Option<String>, Option<Vec<u8>>);
    let rows_by_id = |out: &std::path::Path, rps: u64| -> Vec<Row> {
        let mut all = Vec::new();
        for (shard, b) in read_all(out) {
            let ids = u64s(&b, "id");
            let keys = strings(&b, "key");
            let status = strings(&b, "status");
            let reason = strings(&b, "reason");
            let image = b.column_by_name("image").unwrap().as_any().downcast_ref::<StructArray>().unwrap();
            let bytes = image.column(0).as_any().downcast_ref::<BinaryArray>().unwrap();
            let paths = image.column(1).as_any().downcast_ref::<arrow::array::StringArray>().unwrap();
            for i in 0..b.num_rows() {
                assert_eq!(ids[i], shard * rps + i as u64, "input order kept");
                let key = keys[i].clone().unwrap();
                assert_eq!(key, format!("{shard:05}{i:04}"));
                if image.is_valid(i) {
                    assert!(paths.value(i).starts_with(&format!("{key}.")), "row {}: image path {} for key {key}", ids[i], paths.value(i));
                }
                all.push((status[i].clone().unwrap(), reason[i].clone(), image.is_valid(i).then(|| bytes.value(i).to_vec())));
            }
            let stats: recap::sink::ShardStats =
                serde_json::from_slice(&std::fs::read(out.join(format!("{shard:05}.stats.json"))).unwrap()).unwrap();
            assert_eq!(stats.rows, b.num_rows() as u64);
            assert_eq!(stats.status.values().sum::<u64>(), stats.rows);
            let marker: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(format!("{shard:05}.done"))).unwrap()).unwrap();
            assert_eq!(marker["rows"], b.num_rows() as u64);
        }
        all
    };
    let (big, p) = run("big", 290);
    let s = engine::run(&config::load(&p, &[]).unwrap(), &RunOptions::default()).await.unwrap();
    assert_eq!((s.rows, s.shards_written.clone()), (300, vec![0, 1]));
    let (small, p) = run("small", 20);
    engine::run(&config::load(&p, &[]).unwrap(), &RunOptions::default()).await.unwrap();
    let (a, b) = (rows_by_id(&big, 290), rows_by_id(&small, 20));
    assert_eq!(a.len(), 300);
    for (id, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "row {id}");
    }
    let count = |st: &str| a.iter().filter(|r| r.0 == st).count();
    assert!(count("ok") > 200 && count("http_error") > 0 && count("decode_failed") > 0, "{:?}", s.status);
    if cfg!(feature = "query") {
        assert!(count("filtered") > 20, "{:?}", s.status);
        assert!(a.iter().filter(|r| r.0 == "filtered").all(|r| r.2.is_none()));
    }
}
