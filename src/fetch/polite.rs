//! Per-host politeness: a token bucket on request starts (`download.rate_per_host`) and a limit
//! on requests in flight that adapts as TCP's congestion window does: halved when the host says
//! it is overloaded (429, 503, a timeout), at most once per round trip (an overload answer to a
//! request sent before the last halving does not halve again), and grown back by one request per
//! window of successes (slow recovery), never past `download.per_host`. Host state is
//! pruned when idle, so memory does not grow with the number of hosts a list names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Hosts idle this long, at their full window, are forgotten when the map is pruned.
const IDLE: Duration = Duration::from_secs(60);
/// The map is pruned when it holds more hosts than this.
const PRUNE_ABOVE: usize = 4096;

/// What one request said about the host's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// An answer (any status but 429/503): the host keeps up.
    Ok,
    /// 429, 503 or a timeout: the host is overloaded.
    Overloaded,
    /// Says nothing about load (a refused URL, a connection that never opened).
    Neutral,
}

#[derive(Debug)]
struct GateState {
    in_flight: u32,
    /// The adaptive window: requests allowed in flight (≥ 1, ≤ max).
    window: f64,
    tokens: f64,
    refilled: Instant,
    last_halved: Option<Instant>,
    last_used: Instant,
}

/// One host's limits.
#[derive(Debug)]
pub struct HostGate {
    state: Mutex<GateState>,
    released: Notify,
    max: u32,
    /// Requests per second; `None`: no rate limit.
    rate: Option<f64>,
    burst: f64,
    adaptive: bool,
}

/// A request slot on a host; given back when dropped.
pub struct Permit {
    gate: Arc<HostGate>,
    started: Instant,
}

impl Permit {
    /// Adapt the host's window to what this request said.
    pub fn record(&self, signal: Signal) {
        self.gate.record(signal, self.started);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock().expect("gate lock");
        s.in_flight -= 1;
        s.last_used = Instant::now();
        drop(s);
        self.gate.released.notify_waiters();
    }
}

impl HostGate {
    fn new(max: u32, rate: Option<f64>, adaptive: bool) -> Self {
        let now = Instant::now();
        // The bucket holds one second of requests, at most `max` (a burst as wide as the window).
        let burst = rate.map(|r| r.min(max as f64).max(1.0)).unwrap_or(0.0);
        HostGate {
            state: Mutex::new(GateState {
                in_flight: 0,
                window: max as f64,
                tokens: burst,
                refilled: now,
                last_halved: None,
                last_used: now,
            }),
            released: Notify::new(),
            max,
            rate,
            burst,
            adaptive,
        }
    }

    /// Wait for a slot in the window and a token, then take both.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut s = self.state.lock().expect("gate lock");
                let now = Instant::now();
                if let Some(rate) = self.rate {
                    s.tokens = (s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate).min(self.burst);
                    s.refilled = now;
                }
                if (s.in_flight as f64) < s.window.floor().max(1.0) {
                    match self.rate {
                        Some(rate) if s.tokens < 1.0 => Some(Duration::from_secs_f64((1.0 - s.tokens) / rate)),
                        _ => {
                            if self.rate.is_some() {
                                s.tokens -= 1.0;
                            }
                            s.in_flight += 1;
                            s.last_used = now;
                            return Permit { gate: self.clone(), started: now };
                        }
                    }
                } else {
                    None
                }
            };
            match wait {
                // Waiting for a token; a release does not bring one sooner.
                Some(d) => tokio::time::sleep(d).await,
                None => notified.await,
            }
        }
    }

    /// Adapt the window to what a request started at `started` said.
    fn record(&self, signal: Signal, started: Instant) {
        if !self.adaptive {
            return;
        }
        let grew = {
            let mut s = self.state.lock().expect("gate lock");
            match signal {
                Signal::Neutral => false,
                Signal::Overloaded => {
                    if s.last_halved.is_none_or(|t| started >= t) {
                        s.window = (s.window / 2.0).max(1.0);
                        s.last_halved = Some(Instant::now());
                    }
                    false
                }
                Signal::Ok => {
                    let before = s.window.floor();
                    // +1 per window of successes: additive increase, as TCP's congestion avoidance.
                    s.window = (s.window + 1.0 / s.window).min(self.max as f64);
                    s.window.floor() > before
                }
            }
        };
        if grew {
            self.released.notify_waiters();
        }
    }

    /// The current window (for tests and logs).
    pub fn window(&self) -> f64 {
        self.state.lock().expect("gate lock").window
    }

    fn idle(&self, now: Instant) -> bool {
        let s = self.state.lock().expect("gate lock");
        s.in_flight == 0 && s.window >= self.max as f64 && now.duration_since(s.last_used) >= IDLE
    }
}

/// The gates of every host seen, keyed by `host:port`.
pub struct Hosts {
    gates: Mutex<HashMap<String, Arc<HostGate>>>,
    max: u32,
    rate: Option<f64>,
    adaptive: bool,
}

impl Hosts {
    pub fn new(max: u32, rate: Option<f64>, adaptive: bool) -> Self {
        Hosts { gates: Mutex::new(HashMap::new()), max, rate: rate.filter(|r| *r > 0.0), adaptive }
    }

    pub fn gate(&self, key: &str) -> Arc<HostGate> {
        let mut map = self.gates.lock().expect("hosts lock");
        if let Some(g) = map.get(key) {
            return g.clone();
        }
        if map.len() >= PRUNE_ABOVE {
            let now = Instant::now();
            map.retain(|_, g| Arc::strong_count(g) > 1 || !g.idle(now));
        }
        let g = Arc::new(HostGate::new(self.max, self.rate, self.adaptive));
        map.insert(key.to_string(), g.clone());
        g
    }

    /// Hosts currently remembered.
    pub fn len(&self) -> usize {
        self.gates.lock().expect("hosts lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn window_halves_once_per_round_trip_and_recovers_slowly() {
        let g = Arc::new(HostGate::new(16, None, true));
        let (a, b) = (g.acquire().await, g.acquire().await);
        a.record(Signal::Overloaded);
        b.record(Signal::Overloaded);
        assert_eq!(g.window(), 8.0, "two overloads of requests sent at the old window halve once");
        drop((a, b));
        g.acquire().await.record(Signal::Overloaded);
        assert_eq!(g.window(), 4.0, "a request sent after the halving halves again");
        for _ in 0..5 {
            g.acquire().await.record(Signal::Ok);
        }
        assert!((5.0..5.3).contains(&g.window()), "about one window of successes adds one: {}", g.window());
        let fixed = Arc::new(HostGate::new(16, None, false));
        fixed.acquire().await.record(Signal::Overloaded);
        assert_eq!(fixed.window(), 16.0);
    }

    #[tokio::test]
    async fn window_bounds_requests_in_flight() {
        let g = Arc::new(HostGate::new(4, None, true));
        g.acquire().await.record(Signal::Overloaded); // window 2
        let a = g.acquire().await;
        let _b = g.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(50), g.acquire()).await;
        assert!(third.is_err(), "a third request waits while the window is 2");
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.acquire().await }
        });
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("a release lets a waiter in").unwrap();
    }

    #[tokio::test]
    async fn token_bucket_paces_request_starts() {
        let g = Arc::new(HostGate::new(64, Some(50.0), false));
        let start = Instant::now();
        for _ in 0..100 {
            drop(g.acquire().await);
        }
        // 50 in the first burst, the next 50 at 50/s: about one second.
        let t = start.elapsed().as_secs_f64();
        assert!((0.9..1.6).contains(&t), "100 starts at 50/s with a burst of 50 took {t:.2}s");
    }

    #[test]
    fn idle_hosts_are_pruned() {
        let hosts = Hosts::new(4, None, true);
        for i in 0..PRUNE_ABOVE {
            let g = hosts.gate(&format!("h{i}"));
            let mut s = g.state.lock().unwrap();
            s.last_used = s.last_used.checked_sub(IDLE).unwrap();
        }
        assert_eq!(hosts.len(), PRUNE_ABOVE);
        let _held = hosts.gate("h0");
        hosts.gate("new");
        assert_eq!(hosts.len(), 2, "idle hosts dropped; one held and the new one kept");
    }
}
