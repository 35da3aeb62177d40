//! `recap report`: the page is rendered by headless Chromium (Debian's `chromium`; set up by
//! scripts/browser-env.sh) and its DOM checked after the page's script has run.

use std::path::{Path, PathBuf};

use recap::report::{report, ReportOptions};

fn chromium() -> String {
    let c = std::env::var("RECAP_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let ok = std::process::Command::new(&c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "no headless Chromium ({c}): run `bash scripts/browser-env.sh` (scripts/test.sh does)");
    c
}

/// The DOM after scripts ran.
fn dom(html: &Path) -> String {
    let o = std::process::Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// The part of the DOM from the element with this id to the next grid or the end of its section.
fn part<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id}"));
    let rest = &dom[start..];
    let next_grid = rest[10..].find("id=\"grid-").map(|e| e + 10).unwrap_or(rest.len());
    let end = next_grid.min(rest.find("</section>").unwrap_or(rest.len()));
    &rest[..end]
}

fn deduped_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shards");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/shards")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    recap::dedup::dedup(&dir.display().to_string(), &Default::default()).unwrap();
    (tmp, dir)
}

#[test]
fn the_report_renders_every_part() {
    let (tmp, dir) = deduped_copy();
    let out = tmp.path().join("report.html");
    let s = report(&dir.display().to_string(), &out, &ReportOptions::default()).unwrap();
    assert_eq!((s.rows, s.files), (40, 2));
    let html = std::fs::read_to_string(&out).unwrap();
    // Self-contained: nothing to fetch at view time (the shards' URLs appear only as text).
    for external in ["<script src", "<link", "url(http", "@import", "src=\"http"] {
        assert!(!html.contains(external), "the page refers to an outside resource: {external}");
    }
    let d = dom(&out);
    assert!(d.contains("data-ready=\"1\""), "the page's script ran to the end");
    // Summary and funnel: 40 rows, 20 ok after 3 fetch failures, 1 bad image, 12 filtered, 4 duplicates.
    assert!(d.contains("data-kpi=\"rows\"><div class=\"v\">40</div>"), "{}", &d[..2000.min(d.len())]);
    assert!(d.contains("data-kpi=\"ok\"><div class=\"v\">20</div>"));
    assert_eq!(part(&d, "funnel").matches("class=\"step\"").count(), 5);
    for n in ["<b>40</b>", "<b>37</b>", "<b>36</b>", "<b>24</b>", "<b>20</b>"] {
        assert!(part(&d, "funnel").contains(n), "funnel lacks {n}");
    }
    // Failures by reason and by host.
    let reasons = part(&d, "reasons");
    assert!(reasons.contains("HTTP # Not Found") && reasons.contains("duplicate of # (exact: same sha256)"), "{reasons}");
    assert!(part(&d, "hosts").contains("127.0.0.1:18733"));
    // Histograms drew bars.
    assert!(part(&d, "hist-scores").matches("<rect").count() > 5);
    // The grids: 20 sampled ok rows, the 20 worst-aligned, 12 filtered, 4 duplicate pairs.
    assert_eq!(part(&d, "grid-sample").matches("class=\"card\"").count(), 20);
    assert_eq!(part(&d, "grid-worst").matches("class=\"card\"").count(), 20);
    assert_eq!(part(&d, "grid-filtered").matches("class=\"card\"").count(), 12);
    let dups = part(&d, "grid-duplicates");
    assert_eq!(dups.matches("class=\"pair\"").count(), 4);
    assert_eq!(dups.matches("class=\"card\"").count(), 8, "each duplicate beside the row kept");
    assert!(dups.contains("data-dup=\"000010010\"") && dups.contains("data-key=\"000000005\""));
    assert_eq!(part(&d, "grid-sample").matches("<img").count(), 20, "every ok row has its thumbnail");
    // The worst-aligned grid starts with the lowest alt-text score.
    let worst = part(&d, "grid-worst");
    assert!(worst.find("000010005").unwrap() < worst.find("000000010").unwrap());
}

#[test]
fn the_report_samples_a_large_run_and_shows_what_a_plain_run_has() {
    let (tmp, dir) = deduped_copy();
    let out = tmp.path().join("small.html");
    report(&dir.display().to_string(), &out, &ReportOptions { sample: 5, worst: 3, filtered: 2, duplicates: 1, ..Default::default() }).unwrap();
    let d = dom(&out);
    assert_eq!(part(&d, "grid-sample").matches("class=\"card\"").count(), 5);
    assert_eq!(part(&d, "grid-worst").matches("class=\"card\"").count(), 3);
    assert_eq!(part(&d, "grid-duplicates").matches("class=\"pair\"").count(), 1);

    // A plain shard (no model stages): no scores, the rest of the page.
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let (b, _) = recap::sink::read_shard(&dir.join("00000.parquet")).unwrap();
    let reinforced = ["synthetic_captions", "augmentations", "image_embeddings", "text_embeddings", "clip_score", "synthetic_clip_scores"];
    let keep: Vec<usize> = (0..b.num_columns()).filter(|&i| !reinforced.contains(&b.schema().field(i).name().as_str())).collect();
    let p = b.project(&keep).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(plain.join("00000.parquet")).unwrap(), p.schema(), None).unwrap();
    w.write(&p).unwrap();
    w.close().unwrap();
    let out = tmp.path().join("plain.html");
    let s = report(&plain.display().to_string(), &out, &ReportOptions::default()).unwrap();
    assert!(!s.reinforced);
    let d = dom(&out);
    assert!(d.contains("data-ready=\"1\""));
    assert!(part(&d, "hist-scores").contains("not reinforced"));
    assert!(part(&d, "grid-sample").matches("class=\"card\"").count() > 0);

    let e = report(&tmp.path().join("nowhere").display().to_string(), &out, &ReportOptions::default()).unwrap_err().to_string();
    assert!(e.contains("no such directory"), "{e}");
}
