//! Politeness over real loopback HTTP across many hosts: every address 127.0.0.N is a distinct
//! host, each with its own listener. The server logs every request (host, path, time, requests
//! in flight) so the tests measure what a site would see: per-host request rates, backing off
//! when a host answers 429, robots.txt fetched once per host and honoured.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use recap::config::DownloadConfig;
use recap::fetch::Fetcher;
use recap::outcome::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Site {
    /// robots.txt answer: status and body; `None` → 404.
    robots: Option<(u16, String)>,
    in_flight: AtomicU32,
}

#[derive(Default)]
struct Log {
    /// (host, path, when)
    requests: Mutex<Vec<(String, String, Instant)>>,
    sites: Mutex<HashMap<String, Arc<Site>>>,
    too_many: AtomicU32,
}

impl Log {
    fn site(&self, host: &str) -> Arc<Site> {
        self.sites.lock().unwrap().entry(host.to_string()).or_default().clone()
    }
    fn count(&self, host: &str, path: &str) -> usize {
        self.requests.lock().unwrap().iter().filter(|(h, p, _)| h == host && p == path).count()
    }
    fn times(&self, host: &str) -> Vec<Instant> {
        self.requests.lock().unwrap().iter().filter(|(h, _, _)| h == host).map(|(_, _, t)| *t).collect()
    }
}

/// Listeners on 127.0.0.{first}..{first+n} at one port; returns the port.
async fn serve(log: Arc<Log>, first: u8, n: usize) -> u16 {
    let mut port = 0;
    for i in 0..n {
        let ip = Ipv4Addr::new(127, 0, (first as usize + i / 250) as u8, (1 + i % 250) as u8);
        let l = TcpListener::bind(SocketAddr::from((ip, port))).await.expect("bind a loopback address");
        port = l.local_addr().unwrap().port();
        let log = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = l.accept().await else { return };
                tokio::spawn(connection(sock, ip.to_string(), log.clone()));
            }
        });
    }
    port
}

fn host(first: u8, i: usize) -> String {
    Ipv4Addr::new(127, 0, (first as usize + i / 250) as u8, (1 + i % 250) as u8).to_string()
}

async fn connection(mut sock: TcpStream, host: String, log: Arc<Log>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        log.requests.lock().unwrap().push((host.clone(), path.clone(), Instant::now()));
        let site = log.site(&host);
        let (code, body): (u16, Vec<u8>) = if path == "/robots.txt" {
            match &site.robots {
                Some((c, b)) => (*c, b.clone().into_bytes()),
                None => (404, b"not found".to_vec()),
            }
        } else if path.starts_with("/limited/") {
            // A host that can serve two requests at once and answers 429 beyond that.
            let now = site.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let r = if now > 2 {
                log.too_many.fetch_add(1, Ordering::SeqCst);
                (429, b"slow down".to_vec())
            } else {
                tokio::time::sleep(Duration::from_millis(15)).await;
                (200, vec![7u8; 200])
            };
            site.in_flight.fetch_sub(1, Ordering::SeqCst);
            r
        } else {
            (200, vec![7u8; 200])
        };
        let head = format!("HTTP/1.1 {code} X\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", body.len());
        if sock.write_all(head.as_bytes()).await.is_err() || sock.write_all(&body).await.is_err() {
            return;
        }
    }
}

fn config(f: impl FnOnce(&mut DownloadConfig)) -> DownloadConfig {
    let mut c = DownloadConfig { allow_private_networks: true, ..DownloadConfig::default() };
    f(&mut c);
    c
}

/// 100 hosts, 30 requests each, all at once: no host sees more than its bucket allows in any
/// second, and the hosts are served side by side (one host's limit does not hold up others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_on_every_host_and_hosts_run_side_by_side() {
    let log = Arc::new(Log::default());
    let (hosts, per) = (100usize, 30usize);
    let port = serve(log.clone(), 1, hosts).await;
    let f = Fetcher::new(&config(|c| {
        c.concurrency = 4096;
        c.per_host = 4;
        c.rate_per_host = Some(10.0);
    }))
    .unwrap();
    let urls: Vec<String> = (0..hosts).flat_map(|h| (0..per).map(move |i| format!("http://{}:{port}/img/{i}.jpg", host(1, h)))).collect();
    let start = Instant::now();
    let results = join_all(urls.iter().map(|u| f.fetch(Some(u)))).await;
    let took = start.elapsed().as_secs_f64();
    assert!(results.iter().all(|r| r.is_ok()), "every request answered");
    // Per host: 4 at once (the bucket holds min(rate, per_host)), then 26 more at 10/s: ~2.6 s.
    assert!(took < 12.0, "hosts are paced side by side: {took:.1}s for {hosts} hosts (one after another would be ~260s)");
    let mut worst = 0.0f64;
    for h in 0..hosts {
        let t = log.times(&host(1, h));
        assert_eq!(t.len(), per);
        // Any window of w ≥ 1 s holds at most burst + rate·w request arrivals, +3 for timing
        // slack: the server sees arrivals, not starts, and on 2 busy cores (400 connections set
        // up at once, other tests running) a request can arrive up to ~0.3 s after it started,
        // bunching with the next ones.
        for i in 0..t.len() {
            for j in i + 1..t.len() {
                let w = t[j].duration_since(t[i]).as_secs_f64();
                if w < 1.0 {
                    continue;
                }
                let allowed = 4.0 + 10.0 * w + 3.0;
                assert!((j - i + 1) as f64 <= allowed, "host {h}: {} requests in {w:.3}s", j - i + 1);
            }
        }
        let rate = (per - 4) as f64 / t[per - 1].duration_since(t[3]).as_secs_f64().max(1e-3);
        worst = worst.max(rate);
    }
    assert!(worst < 10.0 * 1.3, "after the burst, the fastest host saw {worst:.1} requests/s (limit 10)");
    assert_eq!(f.hosts_remembered(), hosts);
}

/// A host that serves two requests at once and answers 429 to a third: with adaptive concurrency
/// the window closes in on 2 and far fewer 429s are sent than with a fixed per-host limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_backs_off_on_429() {
    let mut too_many = Vec::new();
    for adaptive in [true, false] {
        let log = Arc::new(Log::default());
        let port = serve(log.clone(), 10, 1).await;
        let f = Fetcher::new(&config(|c| {
            c.per_host = 16;
            c.rate_per_host = None;
            c.adaptive_concurrency = adaptive;
            c.retries = 20;
            c.backoff = recap::config::units::HumanDuration(Duration::from_millis(5));
            c.max_retry_after = recap::config::units::HumanDuration(Duration::from_secs(1));
        }))
        .unwrap();
        let urls: Vec<String> = (0..150).map(|i| format!("http://{}:{port}/limited/{i}.jpg", host(10, 0))).collect();
        let results = join_all(urls.iter().map(|u| f.fetch(Some(u)))).await;
        let n429 = log.too_many.load(Ordering::SeqCst);
        if adaptive {
            let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
            assert!(failed.is_empty(), "adaptive: every row gets through: {failed:?}");
            let window = f.host_gate(&reqwest::Url::parse(&urls[0]).unwrap()).window();
            assert!(window < 8.0, "the window closed in on the host's capacity (2): {window}");
        }
        too_many.push(n429);
    }
    let (adaptive, fixed) = (too_many[0], too_many[1]);
    eprintln!("429s answered: {adaptive} adaptive vs {fixed} fixed");
    assert!(adaptive * 3 < fixed, "429s answered: {adaptive} adaptive vs {fixed} with a fixed limit of 16");
}

/// robots.txt is fetched once per host however many rows wait on it, and honoured: rules for our
/// token, the `*` group, a missing file (allow) and a failing one (disallow, RFC 9309).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robots_txt_is_fetched_once_per_host_and_honoured() {
    let log = Arc::new(Log::default());
    let sites = [
        Some((200, "User-agent: *\nDisallow: /\n\nUser-agent: recap\nDisallow: /private/\nAllow: /private/ok/\n".to_string())),
        Some((200, "User-agent: *\nDisallow: /\n".to_string())),
        None,
        Some((503, "down".to_string())),
    ];
    for (i, s) in sites.iter().enumerate() {
        log.sites.lock().unwrap().insert(host(20, i), Arc::new(Site { robots: s.clone(), ..Site::default() }));
    }
    let port = serve(log.clone(), 20, sites.len()).await;
    let url = |i: usize, p: &str| format!("http://{}:{port}{p}", host(20, i));
    let f = Fetcher::new(&config(|c| c.respect_robots_txt = true)).unwrap();
    let mut urls = Vec::new();
    for i in 0..sites.len() {
        for k in 0..10 {
            for p in ["/img/", "/private/", "/private/ok/"] {
                urls.push((i, p, url(i, &format!("{p}{k}.jpg"))));
            }
        }
    }
    let results = join_all(urls.iter().map(|(_, _, u)| f.fetch(Some(u)))).await;
    for ((i, p, u), r) in urls.iter().zip(&results) {
        let want_ok = matches!((i, *p), (0, "/img/") | (0, "/private/ok/") | (2, _));
        match r {
            Ok(_) => assert!(want_ok, "{u} should be refused"),
            Err(fail) => {
                assert!(!want_ok, "{u} should download: {fail:?}");
                assert_eq!(fail.status, Status::OptedOut, "{u}");
                let want = match (i, *p) {
                    (0, _) => "robots.txt: Disallow: /private/ (user-agent recap)",
                    (1, _) => "robots.txt: Disallow: / (user-agent *)",
                    _ => "robots.txt: HTTP 503 for /robots.txt; RFC 9309 treats an unreachable robots.txt as disallowing all",
                };
                assert_eq!(fail.reason, want, "{u}");
            }
        }
    }
    for i in 0..sites.len() {
        assert_eq!(log.count(&host(20, i), "/robots.txt"), 1, "host {i}: robots.txt fetched once");
    }
    // Off (the default): no robots.txt request, everything downloads.
    let log2 = Arc::new(Log::default());
    log2.sites.lock().unwrap().insert(host(30, 0), Arc::new(Site { robots: sites[1].clone(), ..Site::default() }));
    let port2 = serve(log2.clone(), 30, 1).await;
    let f = Fetcher::new(&config(|_| {})).unwrap();
    assert!(f.fetch(Some(&format!("http://{}:{port2}/img/1.jpg", host(30, 0)))).await.is_ok());
    assert_eq!(log2.count(&host(30, 0), "/robots.txt"), 0);
}
