//! Which addresses a URL list may reach, and a caching DNS resolver that enforces it. A URL list
//! is untrusted input: by default nothing on loopback, private, link-local or otherwise
//! non-public addresses is fetched, whatever name points there.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The refusal carried through reqwest's error chain so the row can be marked `blocked`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Blocked(pub String);

pub fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240)
}

pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::UNSPECIFIED)
        }
    }
}

/// Check a URL whose host is an IP literal (the resolver never sees those).
pub fn check_literal(url: &reqwest::Url, allow_private: bool) -> Result<(), Blocked> {
    if allow_private {
        return Ok(());
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        _ => return Ok(()),
    };
    if is_public(ip) {
        Ok(())
    } else {
        Err(Blocked(format!("{ip} is not a public address (set download.allow_private_networks to allow it)")))
    }
}

/// Host names whose answers are remembered at most.
const DNS_CACHE_CAP: usize = 65_536;

type Cache = Arc<Mutex<HashMap<String, (Instant, Vec<SocketAddr>)>>>;

/// A resolver that caches answers for `ttl` and drops non-public addresses unless allowed.
pub struct CachingResolver {
    cache: Cache,
    ttl: Duration,
    allow_private: bool,
}

impl CachingResolver {
    pub fn new(ttl: Duration, allow_private: bool) -> Arc<Self> {
        Arc::new(CachingResolver { cache: Arc::default(), ttl, allow_private })
    }
}

impl Resolve for CachingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let cached = {
            let cache = self.cache.lock().expect("dns cache lock");
            cache.get(&host).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, a)| a.clone())
        };
        let allow_private = self.allow_private;
        let ttl = self.ttl;
        let cache = self.cache.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match cached {
                Some(a) => a,
                None => {
                    let a: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
                    let mut cache = cache.lock().expect("dns cache lock");
                    if cache.len() >= DNS_CACHE_CAP {
                        // Bounded memory on lists naming millions of hosts: expired answers go
                        // first, everything if that is not enough.
                        cache.retain(|_, (at, _)| at.elapsed() < ttl);
                        if cache.len() >= DNS_CACHE_CAP {
                            cache.clear();
                        }
                    }
                    cache.insert(host.clone(), (Instant::now(), a.clone()));
                    a
                }
            };
            let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| allow_private || is_public(a.ip())).collect();
            if allowed.is_empty() && !addrs.is_empty() {
                return Err(Box::new(Blocked(format!(
                    "{host} resolves to {}, which is not a public address (set download.allow_private_networks to allow it)",
                    addrs[0].ip()
                ))) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_are_not_public() {
        for ip in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1"] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
