//! Inbound rate limiting per client address (`RATE_LIMIT_MAX` requests per
//! `RATE_LIMIT_WINDOW_MS`, the original service's names), with `governor`'s
//! GCRA: a client may burst up to the maximum, then gets one more request
//! every `window / max`. Over the limit: 429 with `Retry-After`.
//!
//! The defaults (60,000 a minute: bursts of 60,000, then 1,000 a second)
//! sit far above what a CRM sends, so only a runaway or abusive client is
//! held back. An IPv6 client is one /64 network (one host can use a whole
//! /64). Behind a reverse proxy every request comes from the proxy's
//! address: limit at the proxy instead, or raise the limit. A refused
//! request's connection is closed.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::ApiError;
use crate::config::RateLimit;

/// How often (in requests) addresses not seen for a while are forgotten.
const FORGET_EVERY: u64 = 4096;

/// The limiter shared by every connection.
pub struct Limiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    config: RateLimit,
    seen: AtomicU64,
}

impl Limiter {
    pub fn new(config: RateLimit) -> Limiter {
        let max = NonZeroU32::new(config.max).unwrap_or(NonZeroU32::MIN);
        let period = (config.window / max.get()).max(std::time::Duration::from_nanos(1));
        let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_second(max)).allow_burst(max);
        Limiter { limiter: DefaultKeyedRateLimiter::keyed(quota), config, seen: AtomicU64::new(0) }
    }

    /// Count one request from `ip`; `Err(seconds to wait)` when over.
    fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let ip = client_key(ip);
        if self.seen.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// The client a request counts against: an IPv4 address, or an IPv6 /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Middleware: refuse a client over its limit.
pub async fn limit(State(limiter): State<Arc<Limiter>>, request: Request, next: Next) -> Response {
    let Some(peer) = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0) else {
        return next.run(request).await;
    };
    match limiter.check(peer.ip()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let RateLimit { max, window } = limiter.config;
            let detail = format!(
                "more than {max} requests in {} ms from {}; retry after {wait} s (RATE_LIMIT_MAX, RATE_LIMIT_WINDOW_MS)",
                window.as_millis(),
                peer.ip()
            );
            let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", detail).into_response();
            response.headers_mut().insert("retry-after", wait.max(1).into());
            response.headers_mut().insert("connection", axum::http::HeaderValue::from_static("close"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_client_may_burst_to_the_maximum_then_waits() {
        let l = Limiter::new(RateLimit { max: 3, window: Duration::from_secs(60) });
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        assert!((0..3).all(|_| l.check(a).is_ok()));
        let wait = l.check(a).unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(l.check(b).is_ok(), "other clients are not held back");
    }

    #[test]
    fn an_ipv6_client_is_its_64_network() {
        let l = Limiter::new(RateLimit { max: 2, window: Duration::from_secs(60) });
        assert!(l.check("2001:db8:1:2::1".parse().unwrap()).is_ok());
        assert!(l.check("2001:db8:1:2:ffff::9".parse().unwrap()).is_ok());
        assert!(l.check("2001:db8:1:2:abcd::7".parse().unwrap()).is_err(), "the same /64");
        assert!(l.check("2001:db8:1:3::1".parse().unwrap()).is_ok(), "another /64");
    }
}
