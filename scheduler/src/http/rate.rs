//! Request rate limits of the control API, per client: a GCRA bucket (`governor`)
//! per key, refilled at [`ApiLimits::rate_per_second`] and holding up to
//! [`ApiLimits::rate_burst`] requests. A request over its key's rate gets 429
//! (`rate_limited`) with a `Retry-After` saying when the next one will pass.
//!
//! The key is [`rate_key`]'s: the authenticated identity an outer layer put in the
//! request's extensions as a [`RateKey`], else the client's address (an IPv6
//! client by its /64, as the listener counts it). The set of keys is bounded by
//! [`ApiLimits::rate_max_keys`]: when it is full, keys whose buckets are full
//! again are forgotten, and while it is still full, requests are counted in a
//! fixed number of overflow buckets chosen by a hash of their key, so a crowd of
//! addresses can neither grow the set nor escape the limit.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aigrid_api::ErrorCode;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use super::plumbing::{ApiError, ApiLimits, RateKey};
use crate::listener::client_key;

/// Overflow buckets shared by the clients that find the key set full.
const OVERFLOW_BUCKETS: u64 = 64;
/// Least time between two sweeps of the key set when it is full.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// What a request is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// An identity an authentication layer vouched for.
    Identity(String),
    /// A client address, as [`client_key`] gives it.
    Client(IpAddr),
    /// One of the buckets shared while the key set is full.
    Overflow(u64),
}

/// The key a request is counted under: the [`RateKey`] in its extensions, if an
/// authentication layer put one there, else its client's address; `None` for a
/// request that is not limited (a loopback client, signed or not, unless the limits
/// say otherwise, or an unsigned request that came without an address).
pub(crate) fn rate_key(req: &Request, limit_loopback: bool) -> Option<Key> {
    let address = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    if !limit_loopback && address.is_some_and(|ip| ip.to_canonical().is_loopback()) {
        return None;
    }
    if let Some(RateKey(identity)) = req.extensions().get::<RateKey>() {
        return Some(Key::Identity(identity.clone()));
    }
    Some(Key::Client(client_key(address?)))
}

/// The limiter every request of one server goes through.
pub(crate) struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<Key>,
    max_keys: usize,
    limit_loopback: bool,
    started: Instant,
    /// Milliseconds after `started` of the last sweep.
    swept_ms: AtomicU64,
}

impl RateLimiter {
    /// A limiter for `limits`, or `None` when they set no rate.
    pub(crate) fn new(limits: &ApiLimits) -> Option<Arc<Self>> {
        let rate = NonZeroU32::new(limits.rate_per_second)?;
        let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(rate);
        Some(Arc::new(RateLimiter {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            max_keys: limits.rate_max_keys.max(1),
            limit_loopback: limits.listener.limit_loopback,
            started: Instant::now(),
            swept_ms: AtomicU64::new(0),
        }))
    }

    /// The key `key` is counted under now: itself while the key set has room (or
    /// it is full of keys that can be forgotten), else an overflow bucket.
    fn bounded(&self, key: Key) -> Key {
        if self.limiter.len() < self.max_keys {
            return key;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= SWEEP_EVERY.as_millis() as u64
            && self
                .swept_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            if self.limiter.len() < self.max_keys {
                return key;
            }
        }
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        Key::Overflow(hasher.finish() % OVERFLOW_BUCKETS)
    }

    /// `Ok` when `key` may make a request now, else how long until it may.
    pub(crate) fn check(&self, key: Key) -> Result<(), Duration> {
        let key = self.bounded(key);
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Keys held now (tests).
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// The 429 a request over its rate gets: the API's error body and `Retry-After`
/// in whole seconds, at least 1.
fn too_many(wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let seconds = seconds.max(1);
    let mut response = ApiError::new(
        ErrorCode::RateLimited,
        format!("too many requests from this client; retry in {seconds}s"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// The middleware: counts the request against its key, or answers 429.
pub(crate) async fn limit_rate(
    State(limiter): State<Arc<RateLimiter>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = rate_key(&req, limiter.limit_loopback) {
        if let Err(wait) = limiter.check(key) {
            return too_many(wait);
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    fn limits(rate: u32, burst: u32, keys: usize) -> ApiLimits {
        let mut limits = ApiLimits {
            rate_per_second: rate,
            rate_burst: burst,
            rate_max_keys: keys,
            ..ApiLimits::default()
        };
        limits.listener.limit_loopback = true;
        limits
    }

    fn from(ip: &str) -> Request {
        let mut req = Request::new(Body::empty());
        let addr = SocketAddr::new(ip.parse().unwrap(), 40_000);
        req.extensions_mut().insert(ConnectInfo(addr));
        req
    }

    #[test]
    fn an_identity_in_the_extensions_wins_over_the_address() {
        let mut req = from("203.0.113.5");
        assert_eq!(
            rate_key(&req, false),
            Some(Key::Client("203.0.113.5".parse().unwrap()))
        );
        req.extensions_mut().insert(RateKey("node:n1".into()));
        assert_eq!(rate_key(&req, false), Some(Key::Identity("node:n1".into())));
        // Loopback is left alone unless asked; a request without an address too.
        assert_eq!(rate_key(&from("127.0.0.1"), false), None);
        assert!(rate_key(&from("::1"), true).is_some());
        assert_eq!(rate_key(&Request::new(Body::empty()), true), None);
        // A signer on loopback is left alone too, and counted as itself if asked.
        let mut local = from("127.0.0.1");
        local.extensions_mut().insert(RateKey("node:n1".into()));
        assert_eq!(rate_key(&local, false), None);
        assert_eq!(
            rate_key(&local, true),
            Some(Key::Identity("node:n1".into()))
        );
    }

    #[test]
    fn a_client_over_its_burst_waits_and_others_do_not() {
        let limiter = RateLimiter::new(&limits(1, 3, 100)).unwrap();
        let a = Key::Client("198.51.100.1".parse().unwrap());
        for _ in 0..3 {
            limiter.check(a.clone()).unwrap();
        }
        let wait = limiter.check(a.clone()).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        limiter
            .check(Key::Client("198.51.100.2".parse().unwrap()))
            .unwrap();
        assert!(
            RateLimiter::new(&limits(0, 5, 100)).is_none(),
            "rate 0 is no limit"
        );
    }

    #[test]
    fn a_full_key_set_sends_new_clients_to_shared_buckets() {
        let limiter = RateLimiter::new(&limits(1, 1, 4)).unwrap();
        for i in 0..200 {
            let key = Key::Client(format!("192.0.2.{}", i % 250).parse().unwrap());
            let _ = limiter.check(key);
        }
        // Four clients' own keys and at most every overflow bucket, never 200.
        assert!(
            limiter.keys() <= 4 + OVERFLOW_BUCKETS as usize,
            "{}",
            limiter.keys()
        );
    }

    #[test]
    fn the_answer_says_when_to_come_back() {
        let response = too_many(Duration::from_millis(1500));
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(too_many(Duration::ZERO).headers()[header::RETRY_AFTER], "1");
    }
}
