//! HTTP download: one reqwest client (connection reuse, a caching resolver that refuses
//! non-public targets), per-host politeness (a rate limit and an adaptive limit on requests in
//! flight, [`polite`]), robots.txt ([`robots`]) fetched once per host when asked, retries with
//! exponential back-off and jitter that honour `Retry-After`, bounded redirects, bodies streamed
//! and cut at `max_bytes`, and `X-Robots-Tag` opt-outs. Every failure becomes a status.

pub mod net;
pub mod polite;
pub mod robots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderName, CONTENT_LENGTH, RETRY_AFTER};

const X_ROBOTS_TAG: HeaderName = HeaderName::from_static("x-robots-tag");
use tokio::sync::OnceCell;

use crate::config::units::HumanDuration;
use crate::config::DownloadConfig;
use crate::outcome::Status;

pub use net::Blocked;
use polite::{HostGate, Hosts, Signal};
use robots::Robots;

/// robots.txt bodies longer than this are cut (RFC 9309 asks crawlers to read at least 500 KiB).
const ROBOTS_MAX_BYTES: usize = 512 * 1024;
/// Sites whose robots.txt is remembered; past this, the parsed ones are forgotten and fetched
/// again if their host comes back (memory stays bounded on lists naming millions of hosts).
const ROBOTS_CACHE_CAP: usize = 100_000;
/// The most a body buffer is sized up front from a Content-Length header (larger bodies grow as
/// they arrive), so that a lying header cannot make recap reserve `max_bytes` per request.
const PRESIZE_LIMIT: u64 = 16 << 20;

/// A redirect refused by our policy (too many, or a loop).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
struct RedirectError(String);

/// A body that came back.
#[derive(Debug, Clone)]
pub struct Body {
    pub bytes: Bytes,
    pub http_status: u16,
    pub content_type: Option<String>,
    pub attempts: u8,
    pub seconds: f64,
}

/// A row that failed to download.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub status: Status,
    pub reason: String,
    pub http_status: Option<u16>,
    pub attempts: u8,
    pub bytes: u64,
    pub seconds: f64,
}

struct AttemptFail {
    status: Status,
    reason: String,
    http_status: Option<u16>,
    retry_after: Option<Duration>,
    bytes: u64,
}

impl AttemptFail {
    fn new(status: Status, reason: impl Into<String>) -> Self {
        AttemptFail { status, reason: reason.into(), http_status: None, retry_after: None, bytes: 0 }
    }
}

/// Downloads URLs under the configured limits.
pub struct Fetcher {
    client: reqwest::Client,
    cfg: DownloadConfig,
    hosts: Hosts,
    /// robots.txt per `scheme://host:port`, fetched once however many rows wait for it.
    robots: Mutex<HashMap<String, Arc<OnceCell<Arc<Robots>>>>>,
    /// Lower-cased product token of our User-Agent, to match `X-Robots-Tag: <bot>: noai` and
    /// robots.txt groups.
    product: String,
}

impl Fetcher {
    pub fn new(cfg: &DownloadConfig) -> Result<Self, String> {
        let max_redirects = cfg.max_redirects as usize;
        let allow_private = cfg.allow_private_networks;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            let n = attempt.previous().len();
            if attempt.previous().iter().any(|u| u == attempt.url()) {
                let chain: Vec<String> = attempt.previous().iter().map(|u| u.path().to_string()).collect();
                let msg = format!("redirect loop: {} -> {}", chain.join(" -> "), attempt.url().path());
                return attempt.error(RedirectError(msg));
            }
            if n > max_redirects {
                return attempt.error(RedirectError(format!("more than {max_redirects} redirects (download.max_redirects)")));
            }
            if !matches!(attempt.url().scheme(), "http" | "https") {
                let msg = format!("redirect to unsupported scheme {}", attempt.url().scheme());
                return attempt.error(RedirectError(msg));
            }
            if let Err(b) = net::check_literal(attempt.url(), allow_private) {
                return attempt.error(b);
            }
            attempt.follow()
        });
        let client = reqwest::Client::builder()
            .user_agent(cfg.user_agent.clone())
            .redirect(policy)
            .dns_resolver(net::CachingResolver::new(Duration::from_secs(300), cfg.allow_private_networks))
            .connect_timeout(cfg.timeout.0)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let product = cfg.user_agent.split(['/', ' ']).next().unwrap_or("").to_ascii_lowercase();
        let hosts = Hosts::new(cfg.per_host, cfg.rate_per_host, cfg.adaptive_concurrency);
        Ok(Fetcher { client, cfg: cfg.clone(), hosts, robots: Mutex::new(HashMap::new()), product })
    }

    /// The politeness state of a URL's host (for tests and logs).
    pub fn host_gate(&self, url: &reqwest::Url) -> Arc<HostGate> {
        self.hosts.gate(&host_key(url))
    }

    /// Hosts whose politeness state is remembered.
    pub fn hosts_remembered(&self) -> usize {
        self.hosts.len()
    }

    /// What the site's robots.txt says about us, fetched on first use (through the host's gate:
    /// it counts against the rate limit) and then cached; concurrent rows wait for one fetch.
    async fn robots_for(&self, url: &reqwest::Url, gate: &Arc<HostGate>) -> Arc<Robots> {
        let site = format!("{}://{}", url.scheme(), host_key(url));
        let cell = {
            let mut map = self.robots.lock().expect("robots lock");
            if map.len() >= ROBOTS_CACHE_CAP && !map.contains_key(&site) {
                map.retain(|_, c| !c.initialized());
            }
            map.entry(site).or_default().clone()
        };
        cell.get_or_init(|| async { Arc::new(self.fetch_robots(url, gate).await) }).await.clone()
    }

    async fn fetch_robots(&self, url: &reqwest::Url, gate: &Arc<HostGate>) -> Robots {
        let mut u = url.clone();
        u.set_path("/robots.txt");
        u.set_query(None);
        u.set_fragment(None);
        let permit = gate.acquire().await;
        let fetched = tokio::time::timeout(self.cfg.timeout.0, async {
            let mut resp = self.client.get(u).send().await?;
            let code = resp.status().as_u16();
            let mut body = Vec::new();
            if resp.status().is_success() {
                while let Some(chunk) = resp.chunk().await? {
                    body.extend_from_slice(&chunk);
                    if body.len() >= ROBOTS_MAX_BYTES {
                        body.truncate(ROBOTS_MAX_BYTES);
                        break;
                    }
                }
            }
            Ok::<_, reqwest::Error>((code, body))
        })
        .await;
        match fetched {
            Ok(Ok((code, body))) => {
                permit.record(if code == 429 || code == 503 { Signal::Overloaded } else { Signal::Ok });
                match code {
                    200..=299 => Robots::parse(&String::from_utf8_lossy(&body), &self.product),
                    429 | 500..=599 => Robots::DisallowAll {
                        why: format!("HTTP {code} for /robots.txt; RFC 9309 treats an unreachable robots.txt as disallowing all"),
                    },
                    // 3xx past our redirect limit, 4xx: no robots.txt, everything allowed.
                    _ => Robots::AllowAll,
                }
            }
            // A host that cannot be reached (or a refused redirect) is left to the image request,
            // which reports its own status (download_failed, timeout, blocked).
            Ok(Err(_)) => Robots::AllowAll,
            Err(_) => {
                permit.record(Signal::Overloaded);
                Robots::AllowAll
            }
        }
    }

    /// Download one URL, with retries. Never panics; every failure is a [`Failure`].
    pub async fn fetch(&self, url: Option<&str>) -> Result<Body, Failure> {
        let start = Instant::now();
        let fail_now = |status, reason: String| Failure { status, reason, http_status: None, attempts: 0, bytes: 0, seconds: 0.0 };
        let raw = url.map(str::trim).unwrap_or("");
        if raw.is_empty() {
            return Err(fail_now(Status::InvalidUrl, "empty URL".into()));
        }
        let parsed = reqwest::Url::parse(raw).map_err(|e| fail_now(Status::InvalidUrl, format!("cannot parse URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(fail_now(Status::InvalidUrl, format!("unsupported scheme {:?}; expected http or https", parsed.scheme())));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(fail_now(Status::InvalidUrl, "URL has no host".into()));
        }
        if let Err(b) = net::check_literal(&parsed, self.cfg.allow_private_networks) {
            return Err(fail_now(Status::Blocked, b.0));
        }
        let gate = self.hosts.gate(&host_key(&parsed));
        if self.cfg.respect_robots_txt {
            let robots = self.robots_for(&parsed, &gate).await;
            let path = match parsed.query() {
                Some(q) => format!("{}?{q}", parsed.path()),
                None => parsed.path().to_string(),
            };
            if let Some(reason) = robots.refusal(&path) {
                let mut f = fail_now(Status::OptedOut, reason);
                f.seconds = start.elapsed().as_secs_f64();
                return Err(f);
            }
        }
        let mut downloaded = 0u64;
        let mut attempt: u32 = 0;
        loop {
            let result = {
                let permit = gate.acquire().await;
                let r = self.attempt(parsed.clone()).await;
                permit.record(signal(&r));
                r
            };
            let fail = match result {
                Ok(mut body) => {
                    body.attempts = (attempt + 1) as u8;
                    body.seconds = start.elapsed().as_secs_f64();
                    return Ok(body);
                }
                Err(f) => f,
            };
            downloaded += fail.bytes;
            let retryable = fail.status.is_retryable(fail.http_status);
            let make = |fail: AttemptFail, extra: &str| Failure {
                status: fail.status,
                reason: if attempt == 0 { format!("{}{extra}", fail.reason) } else { format!("{} (after {} attempts){extra}", fail.reason, attempt + 1) },
                http_status: fail.http_status,
                attempts: (attempt + 1) as u8,
                bytes: downloaded,
                seconds: start.elapsed().as_secs_f64(),
            };
            if !retryable || attempt >= self.cfg.retries {
                return Err(make(fail, ""));
            }
            let delay = match fail.retry_after {
                Some(d) if d > self.cfg.max_retry_after.0 => {
                    let extra = format!(
                        "; Retry-After {} is longer than download.max_retry_after ({})",
                        HumanDuration(d),
                        self.cfg.max_retry_after
                    );
                    return Err(make(fail, &extra));
                }
                Some(d) => d,
                None => {
                    let base = self.cfg.backoff.0.as_secs_f64() * 2f64.powi(attempt as i32);
                    let jitter: f64 = rand::rng().random_range(0.5..1.5);
                    Duration::from_secs_f64(base * jitter)
                }
            };
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    async fn attempt(&self, url: reqwest::Url) -> Result<Body, AttemptFail> {
        let timeout = self.cfg.timeout;
        match tokio::time::timeout(timeout.0, self.attempt_inner(url)).await {
            Ok(r) => r,
            Err(_) => Err(AttemptFail::new(Status::Timeout, format!("no complete response within {timeout}"))),
        }
    }

    async fn attempt_inner(&self, url: reqwest::Url) -> Result<Body, AttemptFail> {
        let mut resp = self.client.get(url).send().await.map_err(|e| classify(&e))?;
        let code = resp.status();
        if !code.is_success() {
            let retry_after = resp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
            let mut f = AttemptFail::new(
                Status::HttpError,
                format!("HTTP {} {}", code.as_u16(), code.canonical_reason().unwrap_or("")).trim_end().to_string(),
            );
            f.http_status = Some(code.as_u16());
            f.retry_after = retry_after;
            return Err(f);
        }
        let with_code = |mut f: AttemptFail| {
            f.http_status = Some(code.as_u16());
            f
        };
        if self.cfg.respect_opt_out {
            if let Some(directive) = self.opt_out(resp.headers()) {
                return Err(with_code(AttemptFail::new(Status::OptedOut, format!("X-Robots-Tag: {directive}"))));
            }
        }
        let max = self.cfg.max_bytes.0;
        let declared = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(len) = declared {
            if len > max {
                return Err(with_code(AttemptFail::new(
                    Status::TooLarge,
                    format!("Content-Length {len} is more than download.max_bytes ({})", self.cfg.max_bytes),
                )));
            }
        }
        let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        // Sized once from Content-Length (already checked against max_bytes; a server that sends
        // less only leaves capacity unused) rather than grown by doubling: every regrowth copied
        // the body into fresh memory.
        let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(0).min(PRESIZE_LIMIT) as usize);
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() as u64 + chunk.len() as u64 > max {
                        let mut f = AttemptFail::new(
                            Status::TooLarge,
                            format!("body is more than download.max_bytes ({}); cut", self.cfg.max_bytes),
                        );
                        f.bytes = buf.len() as u64 + chunk.len() as u64;
                        return Err(with_code(f));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    let (status, reason) = classify_parts(&e);
                    let mut f = AttemptFail::new(status, format!("body cut after {} bytes: {reason}", buf.len()));
                    f.bytes = buf.len() as u64;
                    return Err(with_code(f));
                }
            }
        }
        Ok(Body { bytes: Bytes::from(buf), http_status: code.as_u16(), content_type, attempts: 1, seconds: 0.0 })
    }

    /// The opt-out directive that applies to us, if any.
    fn opt_out(&self, headers: &HeaderMap) -> Option<String> {
        for value in headers.get_all(X_ROBOTS_TAG) {
            let Ok(v) = value.to_str() else { continue };
            // "noai, noimageai" or "somebot: noai": a leading "<agent>:" limits the value to that agent.
            let (agent, rest) = match v.split_once(':') {
                Some((a, r)) if !a.contains(',') && !a.trim().contains(' ') && !self.is_directive(a.trim()) => {
                    (Some(a.trim().to_ascii_lowercase()), r)
                }
                _ => (None, v),
            };
            if let Some(a) = &agent {
                if a != "*" && *a != self.product {
                    continue;
                }
            }
            for d in rest.split(',') {
                let d = d.trim().to_ascii_lowercase();
                if self.is_directive(&d) {
                    return Some(d);
                }
            }
        }
        None
    }

    fn is_directive(&self, d: &str) -> bool {
        self.cfg.opt_out_directives.iter().any(|x| x.eq_ignore_ascii_case(d))
    }
}

/// `host:port`, the key of per-host limits.
fn host_key(url: &reqwest::Url) -> String {
    format!("{}:{}", url.host_str().unwrap_or(""), url.port_or_known_default().unwrap_or(0))
}

/// What an attempt says about its host's load.
fn signal(r: &Result<Body, AttemptFail>) -> Signal {
    match r {
        Ok(_) => Signal::Ok,
        Err(f) if matches!(f.http_status, Some(429 | 503)) || f.status == Status::Timeout => Signal::Overloaded,
        Err(f) if f.http_status.is_some() => Signal::Ok,
        Err(_) => Signal::Neutral,
    }
}

/// `Retry-After: 5` or `Retry-After: <HTTP date>`.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn classify(e: &reqwest::Error) -> AttemptFail {
    let (status, reason) = classify_parts(e);
    AttemptFail::new(status, reason)
}

/// Status and a short reason from a reqwest error, looking through its chain for our own refusals.
fn classify_parts(e: &reqwest::Error) -> (Status, String) {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<Blocked>() {
            return (Status::Blocked, b.0.clone());
        }
        if let Some(r) = s.downcast_ref::<RedirectError>() {
            return (Status::TooManyRedirects, r.0.clone());
        }
        innermost = s.to_string();
        src = s.source();
    }
    if e.is_timeout() {
        return (Status::Timeout, innermost);
    }
    let what = if e.is_connect() {
        "connect error"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else {
        "request error"
    };
    (Status::DownloadFailed, format!("{what}: {innermost}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn opt_out_directives_respect_agent_scoping() {
        let f = Fetcher::new(&DownloadConfig::default()).unwrap();
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(X_ROBOTS_TAG, v.parse().unwrap());
            m
        };
        assert_eq!(f.opt_out(&h("noai")), Some("noai".into()));
        assert_eq!(f.opt_out(&h("noindex, NoImageAI")), Some("noimageai".into()));
        assert_eq!(f.opt_out(&h("otherbot: noai")), None);
        assert_eq!(f.opt_out(&h("recap: noai")), Some("noai".into()));
        assert_eq!(f.opt_out(&h("noindex")), None);
    }
}
