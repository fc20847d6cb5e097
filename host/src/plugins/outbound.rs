//! Outbound HTTP for plugins, secure by construction: the one place that
//! decides which addresses a plugin's request may reach and which headers
//! it may set.
//!
//! - Every plugin gets two clients. The guarded one, for every request but
//!   those to exactly an origin the operator set, has a resolver that drops
//!   loopback, private, link-local, cloud-metadata and other internal
//!   addresses; a name that resolves only to such addresses fails to
//!   connect, and a literal one is refused before the request is made. The
//!   trusted one, for the operator's own origins (a stand-in on 127.0.0.1,
//!   an internal gateway), resolves as the system does: the operator's
//!   settings are trusted, whatever their names resolve to.
//! - No proxy from the host's environment, no redirects followed.
//! - Hop-by-hop headers (`Host`, `Connection`, `Content-Length`,
//!   `Transfer-Encoding`, … and whatever `Connection` names) are dropped:
//!   the client writes its own framing, so a plugin cannot smuggle a second
//!   request or address another virtual host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use super::allow::AllowList;

/// Headers that describe one connection, not the request; never forwarded.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
];

/// The headers of a plugin's request that may be sent: hop-by-hop headers,
/// `upgrade`, and those the plugin's own `Connection` header names, removed.
pub fn forwardable_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    let named_by_connection: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    headers
        .iter()
        .filter(|(n, _)| {
            let n = n.to_ascii_lowercase();
            !HOP_BY_HOP.contains(&n.as_str()) && n != "upgrade" && !named_by_connection.contains(&n)
        })
        .cloned()
        .collect()
}

/// Whether `ip` is an address a plugin must not reach unless the operator
/// lists it: loopback, private, shared (CGNAT), link-local (cloud metadata
/// included), unspecified, broadcast, multicast, reserved, benchmarking, and
/// IPv6 unique-local and link-local, or an IPv4 one of those inside IPv6.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_internal_v4(v4);
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, fd00:ec2::254 (AWS metadata) included
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        }
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254.0.0/16: cloud metadata
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (Alibaba metadata at 100.100.100.200)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments (Oracle metadata at 192.0.0.192)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

/// The IPv4 address inside an IPv4-mapped, -compatible, NAT64 or 6to4 one.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        [0, 0, 0, 0, 0, 0, _, _] if !v6.is_loopback() && !v6.is_unspecified() => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)),
        _ => None,
    }
}

/// How a request that is not to one of the operator's origins may not go.
const OPERATOR_ONLY: &str =
    "only the operator can allow it, by setting that origin as the URL the plugin's {key} entry names";

/// Refuse a literal internal address in a request that is not to one of
/// the operator's origins (names are checked by the resolver, when they are
/// looked up).
pub fn check_literal_address(url: &Url) -> Result<(), String> {
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        _ => return Ok(()),
    };
    if is_internal(ip) {
        return Err(format!("{ip} is an internal address; {OPERATOR_ONLY}"));
    }
    Ok(())
}

/// A resolver that keeps internal addresses out of what names resolve to.
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<SocketAddr> = found.iter().copied().filter(|a| !is_internal(a.ip())).collect();
            if usable.is_empty() && !found.is_empty() {
                let addresses = found.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
                let err: Box<dyn std::error::Error + Send + Sync> =
                    format!("{host} resolves only to internal addresses ({addresses}); {OPERATOR_ONLY}").into();
                return Err(err);
            }
            let addrs: Addrs = Box::new(usable.into_iter());
            Ok(addrs)
        })
    }
}

/// A plugin's two HTTP clients.
#[derive(Clone)]
pub struct Clients {
    /// For every request but those to an operator's origin.
    guarded: reqwest::Client,
    /// For requests to exactly an origin the operator set.
    trusted: reqwest::Client,
}

impl Clients {
    /// The clients for one plugin.
    pub fn new() -> reqwest::Result<Clients> {
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .connect_timeout(Duration::from_secs(5))
                .pool_idle_timeout(Duration::from_secs(30))
                .user_agent(concat!("crm-event-handler/", env!("CARGO_PKG_VERSION")))
        };
        Ok(Clients { guarded: builder().dns_resolver(Arc::new(GuardedResolver)).build()?, trusted: builder().build()? })
    }

    /// The client a request goes out with.
    pub fn get(&self, route: Route) -> &reqwest::Client {
        match route {
            Route::Operator => &self.trusted,
            Route::Guarded => &self.guarded,
        }
    }
}

/// How an allowed request goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To exactly an origin the operator set: resolved as the system does.
    Operator,
    /// Anywhere else: internal addresses refused.
    Guarded,
}

/// How a request to `url` (already allowed by the allow-list) may go out:
/// refuses a literal internal address that is not the operator's origin.
pub fn route(url: &Url, allow: &AllowList) -> Result<Route, String> {
    if allow.is_operator_origin(url) {
        return Ok(Route::Operator);
    }
    check_literal_address(url)?;
    Ok(Route::Guarded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal(s: &str) -> bool {
        is_internal(s.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "192.0.0.192",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(internal(ip), "{ip}");
        }
        for ip in ["8.8.8.8", "157.240.22.35", "2a03:2880:f12f:83:face:b00c::25de", "::ffff:8.8.8.8"] {
            assert!(!internal(ip), "{ip}");
        }
    }

    #[test]
    fn a_literal_internal_address_needs_exactly_the_operators_origin() {
        let url = |u: &str| Url::parse(u).unwrap();
        assert!(check_literal_address(&url("http://169.254.169.254/latest")).is_err());
        assert!(check_literal_address(&url("http://[::1]:8080/")).is_err());
        assert!(check_literal_address(&url("https://graph.facebook.com/")).is_ok());
        let allow = AllowList::parse_entries([("http://127.0.0.1:8080", true), ("http://127.0.0.1:*", false)]).unwrap();
        assert_eq!(route(&url("http://127.0.0.1:8080/x"), &allow), Ok(Route::Operator));
        let other_port = route(&url("http://127.0.0.1:6379/x"), &allow);
        assert!(other_port.is_err(), "another port on the operator's host is not the operator's origin");
        assert_eq!(route(&url("https://graph.facebook.com/x"), &allow), Ok(Route::Guarded));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let h = |pairs: &[(&str, &str)]| pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect::<Vec<_>>();
        let sent = forwardable_headers(&h(&[
            ("Host", "169.254.169.254"),
            ("content-length", "0"),
            ("Transfer-Encoding", "chunked"),
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("upgrade", "h2c"),
            ("content-type", "application/json"),
            ("api-key", "k"),
        ]));
        assert_eq!(sent, h(&[("content-type", "application/json"), ("api-key", "k")]));
    }
}
