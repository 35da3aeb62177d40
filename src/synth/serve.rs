//! A small HTTP/1.1 server for a shapeworld, written on raw tokio sockets so that it can
//! misbehave exactly as the web does: fault injection by URL path. It serves tests, benches
//! and the demo over real loopback HTTP, with keep-alive.
//!
//! Paths: `/img/<file>` serves `images/<file>`; `/f/<fault>/img/<file>` serves it with a fault:
//! `404`, `500` (always), `flaky` (503 on the first request, then the image), `429` (429 with
//! `Retry-After: 1` until a second has passed since the first request), `slow` (waits
//! `slow_delay` before answering), `reset` (closes the connection with RST), `truncated`
//! (announces the full length, sends half), `wrong_type` (the image as text/html),
//! `not_image` (an HTML page as image/jpeg), `redirect` (3 redirects, then the image),
//! `redirect_loop`, `oversized` (a body of `oversized_bytes` with Content-Length),
//! `oversized_chunked` (the same without a length), `bomb` (a valid PNG declaring
//! `bomb_side`² pixels), `opt_out` (`X-Robots-Tag: noai`). `/world/<file>` serves a file at
//! the world's top level (its `urls.parquet`, say) with an `ETag`, to GET or HEAD: an input list
//! read over HTTP.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const FAULTS: [&str; 15] = [
    "404", "500", "flaky", "429", "slow", "reset", "truncated", "wrong_type", "not_image", "redirect", "redirect_loop",
    "oversized", "oversized_chunked", "bomb", "opt_out",
];

/// Server behaviour knobs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Added before every response (a slow but healthy web).
    pub latency: Duration,
    pub slow_delay: Duration,
    pub oversized_bytes: usize,
    pub bomb_side: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { latency: Duration::ZERO, slow_delay: Duration::from_secs(30), oversized_bytes: 25_000_000, bomb_side: 20_000 }
    }
}

struct State {
    dir: PathBuf,
    opts: ServeOptions,
    first_seen: Mutex<HashMap<String, (Instant, u32)>>,
    bomb: OnceLock<Vec<u8>>,
    requests: std::sync::atomic::AtomicU64,
}

/// A running server; dropped or [`Server::shutdown`] stops it.
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serve `dir` on 127.0.0.1:`port` (0 picks a free port).
pub async fn serve(dir: PathBuf, port: u16, opts: ServeOptions) -> std::io::Result<Server> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State {
        dir,
        opts,
        first_seen: Mutex::new(HashMap::new()),
        bomb: OnceLock::new(),
        requests: Default::default(),
    });
    let st = state.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else { continue };
            let st = st.clone();
            tokio::spawn(async move {
                let _ = connection(sock, st).await;
            });
        }
    });
    Ok(Server { addr, state, task })
}

async fn connection(mut sock: TcpStream, st: Arc<State>) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let mut buf = Vec::with_capacity(2048);
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > 16 * 1024 {
                return Ok(());
            }
            let mut chunk = [0u8; 2048];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        st.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or("");
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("/").to_string();
        let close = lines.any(|l| l.to_ascii_lowercase().starts_with("connection:") && l.to_ascii_lowercase().contains("close"));
        let keep = respond(&mut sock, &st, method, &path).await?;
        if !keep || close {
            return Ok(());
        }
    }
}

async fn send(sock: &mut TcpStream, code: u16, reason: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<bool> {
    let mut head = format!("HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await?;
    Ok(true)
}

fn content_type(file: &str) -> &'static str {
    if file.ends_with(".png") {
        "image/png"
    } else {
        "image/jpeg"
    }
}

/// A valid PNG of `side`×`side` 1-bit pixels, all black: tiny on the wire, huge when decoded.
fn bomb_png(side: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[1, 0, 0, 0, 0]); // bit depth 1, grayscale
    chunk(&mut out, b"IHDR", &ihdr);
    let row = vec![0u8; 1 + (side as usize).div_ceil(8)];
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    for _ in 0..side {
        z.write_all(&row).expect("in-memory write");
    }
    chunk(&mut out, b"IDAT", &z.finish().expect("in-memory write"));
    chunk(&mut out, b"IEND", &[]);
    out
}

async fn respond(sock: &mut TcpStream, st: &State, method: &str, path: &str) -> std::io::Result<bool> {
    if !st.opts.latency.is_zero() {
        tokio::time::sleep(st.opts.latency).await;
    }
    if method != "GET" && method != "HEAD" {
        return send(sock, 405, "Method Not Allowed", &[], b"").await;
    }
    let path = path.split('?').next().unwrap_or(path);
    let (fault, file) = if let Some(rest) = path.strip_prefix("/f/") {
        match rest.split_once("/img/") {
            Some((f, file)) => (Some(f.to_string()), file.to_string()),
            None => return send(sock, 404, "Not Found", &[], b"not found").await,
        }
    } else if let Some(file) = path.strip_prefix("/img/") {
        (None, file.to_string())
    } else if let Some(file) = path.strip_prefix("/world/") {
        if file.contains("..") || file.contains('/') {
            return send(sock, 404, "Not Found", &[], b"not found").await;
        }
        let p = st.dir.join(file);
        let (Ok(bytes), Ok(meta)) = (std::fs::read(&p), std::fs::metadata(&p)) else {
            return send(sock, 404, "Not Found", &[], b"no such file").await;
        };
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
        let headers = [("Content-Type", "application/octet-stream".to_string()), ("ETag", format!("\"{}-{}\"", bytes.len(), modified.as_nanos()))];
        if method == "HEAD" {
            let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", bytes.len());
            for (k, v) in &headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            sock.write_all(format!("{head}\r\n").as_bytes()).await?;
            return Ok(true);
        }
        return send(sock, 200, "OK", &headers, &bytes).await;
    } else if let Some(rest) = path.strip_prefix("/hop/") {
        // /hop/<n>/<file>: redirect chain steps.
        let (n, file) = rest.split_once('/').unwrap_or(("0", rest));
        let n: u32 = n.parse().unwrap_or(0);
        let next = if n == 0 { format!("/img/{file}") } else { format!("/hop/{}/{file}", n - 1) };
        return send(sock, 302, "Found", &[("Location", next)], b"").await;
    } else if let Some(rest) = path.strip_prefix("/loop/") {
        let (side, file) = rest.split_once('/').unwrap_or(("a", rest));
        let next = format!("/loop/{}/{file}", if side == "a" { "b" } else { "a" });
        return send(sock, 302, "Found", &[("Location", next)], b"").await;
    } else {
        return send(sock, 404, "Not Found", &[], b"not found").await;
    };
    if file.contains("..") || file.contains('/') {
        return send(sock, 404, "Not Found", &[], b"not found").await;
    }
    let read = || std::fs::read(st.dir.join("images").join(&file));
    let ct = content_type(&file);
    let count_request = || {
        let mut seen = st.first_seen.lock().expect("lock");
        let e = seen.entry(path.to_string()).or_insert((Instant::now(), 0));
        e.1 += 1;
        (e.0, e.1)
    };
    match fault.as_deref() {
        None | Some("wrong_type") | Some("opt_out") | Some("slow") => {
            if fault.as_deref() == Some("slow") {
                tokio::time::sleep(st.opts.slow_delay).await;
            }
            let Ok(bytes) = read() else { return send(sock, 404, "Not Found", &[], b"no such image").await };
            let mut headers = vec![("Content-Type", if fault.as_deref() == Some("wrong_type") { "text/html".to_string() } else { ct.to_string() })];
            if fault.as_deref() == Some("opt_out") {
                headers.push(("X-Robots-Tag", "noai".to_string()));
            }
            send(sock, 200, "OK", &headers, &bytes).await
        }
        Some("404") => send(sock, 404, "Not Found", &[], b"gone").await,
        Some("500") => send(sock, 500, "Internal Server Error", &[], b"oops").await,
        Some("flaky") => {
            let (_, n) = count_request();
            if n <= 1 {
                return send(sock, 503, "Service Unavailable", &[], b"try again").await;
            }
            let Ok(bytes) = read() else { return send(sock, 404, "Not Found", &[], b"").await };
            send(sock, 200, "OK", &[("Content-Type", ct.to_string())], &bytes).await
        }
        Some("429") => {
            let (first, _) = count_request();
            if first.elapsed() < Duration::from_secs(1) {
                return send(sock, 429, "Too Many Requests", &[("Retry-After", "1".to_string())], b"slow down").await;
            }
            let Ok(bytes) = read() else { return send(sock, 404, "Not Found", &[], b"").await };
            send(sock, 200, "OK", &[("Content-Type", ct.to_string())], &bytes).await
        }
        Some("reset") => {
            // A zero linger makes the close an RST, as a crashed or hostile server's would be;
            // with a zero timeout the close does not block.
            #[allow(deprecated)]
            let _ = sock.set_linger(Some(Duration::ZERO));
            Ok(false)
        }
        Some("truncated") => {
            let Ok(bytes) = read() else { return send(sock, 404, "Not Found", &[], b"").await };
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n", bytes.len());
            sock.write_all(head.as_bytes()).await?;
            sock.write_all(&bytes[..bytes.len() / 2]).await?;
            sock.flush().await?;
            Ok(false)
        }
        Some("not_image") => {
            send(sock, 200, "OK", &[("Content-Type", "image/jpeg".to_string())], b"<!doctype html><html><body>Access denied</body></html>").await
        }
        Some("redirect") => send(sock, 302, "Found", &[("Location", format!("/hop/2/{file}"))], b"").await,
        Some("redirect_loop") => send(sock, 302, "Found", &[("Location", format!("/loop/a/{file}"))], b"").await,
        Some("oversized") => {
            let body = vec![0u8; st.opts.oversized_bytes];
            send(sock, 200, "OK", &[("Content-Type", "image/jpeg".to_string())], &body).await
        }
        Some("oversized_chunked") => {
            sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n").await?;
            let chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            while sent < st.opts.oversized_bytes {
                sock.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
                sock.write_all(&chunk).await?;
                sock.write_all(b"\r\n").await?;
                sent += chunk.len();
            }
            sock.write_all(b"0\r\n\r\n").await?;
            Ok(true)
        }
        Some("bomb") => {
            let side = st.opts.bomb_side;
            let body = st.bomb.get_or_init(|| bomb_png(side)).clone();
            send(sock, 200, "OK", &[("Content-Type", "image/png".to_string())], &body).await
        }
        Some(_) => send(sock, 404, "Not Found", &[], b"unknown fault").await,
    }
}
