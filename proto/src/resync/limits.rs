//! What a resync client may cost: request size caps, timeouts against slow clients
//! (slowloris), connection caps, per-source-address rate limits and an output cap
//! (DESIGN.md, security rules: resync endpoints). The endpoints serve only what is already
//! signed and encrypted, so they authenticate nobody and rely on these bounds instead.
//!
//! [`Limits`] is plain configuration; [`RateLimiter`] is the per-source token bucket table the
//! listener consults. Neither does any I/O: time is always an argument.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The bounds of the resync endpoints, shared by the HTTP and TCP handlers and the listeners.
///
/// It deserializes from a configuration file's table (serde): every field may be left out (its
/// default), the timeouts are whole milliseconds (`header_timeout_ms`, `idle_timeout_ms`), and a
/// key that is not a field is an error. Check what was read with [`Limits::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The largest request: an HTTP request line and headers, or a TCP request frame.
    /// Default 8 KiB.
    pub max_request_bytes: usize,
    /// The most headers an HTTP request may carry. Default 32.
    pub max_headers: usize,
    /// How long a started request may take to arrive whole; the first request of a
    /// connection is counted from the accept, so a connection must earn its slot within this.
    /// Default 5 s.
    #[serde(rename = "header_timeout_ms", with = "rekeycast_nack::duration_ms")]
    pub header_timeout: Duration,
    /// How long a connection may stay open without sending its first byte, counted from the
    /// accept (the deadline of the first request still applies). Default 2 s.
    #[serde(rename = "silent_timeout_ms", with = "rekeycast_nack::duration_ms")]
    pub silent_timeout: Duration,
    /// How long a connection may stay without traffic before it is closed. Default 30 s.
    #[serde(rename = "idle_timeout_ms", with = "rekeycast_nack::duration_ms")]
    pub idle_timeout: Duration,
    /// The most requests one connection may make; the last is answered, then the connection
    /// closes. Default 10,000.
    pub max_requests_per_connection: u32,
    /// The most connections each endpoint (TCP, HTTP: separate budgets) holds at once. When
    /// it is full, a new connection evicts the one that made progress least recently among
    /// those that wait on their client (nothing sent yet, idle between requests, or a request
    /// still arriving); only when every connection is being answered is the new one refused.
    /// Default 1,024.
    pub max_connections: usize,
    /// The most connections each endpoint holds that have not sent a byte yet: a new
    /// connection beyond it evicts the oldest of them. Default 128.
    pub max_silent_connections: usize,
    /// The most connections one source address may hold at once. Default 16.
    pub max_connections_per_source: usize,
    /// The sustained request rate allowed per source address. Default 200 per second.
    pub requests_per_second_per_source: f64,
    /// The burst of requests allowed per source address. Default 400.
    pub burst_per_source: u32,
    /// The most bytes of output a connection may have waiting: a connection whose client does
    /// not read is closed past it. Default 1 MiB.
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 8 * 1024,
            max_headers: 32,
            header_timeout: Duration::from_secs(5),
            silent_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_requests_per_connection: 10_000,
            max_connections: 1024,
            max_silent_connections: 128,
            max_connections_per_source: 16,
            requests_per_second_per_source: 200.0,
            burst_per_source: 400,
            max_output_bytes: 1024 * 1024,
        }
    }
}

/// The smallest [`Limits::max_request_bytes`] accepted: room for any request of either endpoint.
pub const MIN_REQUEST_BYTES: usize = 256;
/// The smallest [`Limits::max_output_bytes`] accepted: room for a few responses.
pub const MIN_OUTPUT_BYTES: usize = 4096;

/// A [`Limits`] value that cannot work, naming the field and the value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitsError {
    /// A field is out of its range.
    #[error("resync limit {field} = {value} is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value, as text.
        value: String,
        /// What it must be.
        reason: &'static str,
    },
}

impl Limits {
    /// Checks that every bound is usable: sizes that hold a request, non-zero timeouts and
    /// caps, a finite positive rate.
    pub fn validate(&self) -> Result<(), LimitsError> {
        fn invalid(field: &'static str, value: impl ToString, reason: &'static str) -> LimitsError {
            LimitsError::Invalid {
                field,
                value: value.to_string(),
                reason,
            }
        }
        if self.max_request_bytes < MIN_REQUEST_BYTES {
            return Err(invalid(
                "max_request_bytes",
                self.max_request_bytes,
                "at least 256",
            ));
        }
        if self.max_headers == 0 {
            return Err(invalid("max_headers", 0, "at least 1"));
        }
        if self.header_timeout.is_zero() {
            return Err(invalid("header_timeout", "0s", "non-zero"));
        }
        if self.silent_timeout.is_zero() {
            return Err(invalid("silent_timeout", "0s", "non-zero"));
        }
        if self.idle_timeout.is_zero() {
            return Err(invalid("idle_timeout", "0s", "non-zero"));
        }
        if self.max_requests_per_connection == 0 {
            return Err(invalid("max_requests_per_connection", 0, "at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", 0, "at least 1"));
        }
        if self.max_silent_connections == 0 {
            return Err(invalid("max_silent_connections", 0, "at least 1"));
        }
        if self.max_connections_per_source == 0 {
            return Err(invalid("max_connections_per_source", 0, "at least 1"));
        }
        let rate = self.requests_per_second_per_source;
        if !(rate.is_finite() && rate > 0.0) {
            return Err(invalid(
                "requests_per_second_per_source",
                rate,
                "finite and positive",
            ));
        }
        if self.burst_per_source == 0 {
            return Err(invalid("burst_per_source", 0, "at least 1"));
        }
        if self.max_output_bytes < MIN_OUTPUT_BYTES {
            return Err(invalid(
                "max_output_bytes",
                self.max_output_bytes,
                "at least 4096",
            ));
        }
        Ok(())
    }
}

/// Why an endpoint refuses a client before serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The source is over its rate limit: HTTP 429, TCP `RateLimited`.
    RateLimited,
    /// The endpoint is at a connection cap: HTTP 503, TCP `Overloaded`.
    Overloaded,
}

/// The default number of source addresses a [`RateLimiter`] tracks.
pub const DEFAULT_RATE_TABLE_CAPACITY: usize = 65_536;

/// Per-source-address token buckets in a bounded table.
///
/// Each source starts with `burst_per_source` tokens, spends one per request and regains
/// `requests_per_second_per_source` per second up to the burst. The table holds at most
/// `capacity` sources; a new source in a full table evicts the one that asked least recently
/// (O(log n)), so memory is bounded whatever the number of addresses. An evicted source comes
/// back with a full bucket: an attacker with more addresses than the table buys at most one
/// burst per address, which the connection caps bound in turn.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    capacity: usize,
    buckets: HashMap<IpAddr, Bucket>,
    /// The sources ordered by last use: (last use, source).
    by_age: BTreeSet<(Instant, IpAddr)>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A limiter for `limits`, tracking up to [`DEFAULT_RATE_TABLE_CAPACITY`] sources.
    pub fn new(limits: &Limits) -> Self {
        Self::with_capacity(limits, DEFAULT_RATE_TABLE_CAPACITY)
    }

    /// A limiter for `limits`, tracking up to `capacity` sources (at least 1).
    pub fn with_capacity(limits: &Limits, capacity: usize) -> Self {
        let rate = limits.requests_per_second_per_source;
        Self {
            rate: if rate.is_finite() && rate > 0.0 {
                rate
            } else {
                0.0
            },
            burst: f64::from(limits.burst_per_source.max(1)),
            capacity: capacity.max(1),
            buckets: HashMap::new(),
            by_age: BTreeSet::new(),
        }
    }

    /// Whether `source` may make one more request at `now`; spends a token if so.
    pub fn allow(&mut self, now: Instant, source: IpAddr) -> bool {
        let bucket = match self.buckets.get(&source) {
            Some(bucket) => {
                let bucket = *bucket;
                self.by_age.remove(&(bucket.last, source));
                // A clock that goes back refills nothing.
                let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
                Bucket {
                    tokens: (bucket.tokens + elapsed * self.rate).min(self.burst),
                    last: now.max(bucket.last),
                }
            }
            None => {
                if self.buckets.len() >= self.capacity {
                    if let Some(stalest) = self.by_age.pop_first() {
                        self.buckets.remove(&stalest.1);
                    }
                }
                Bucket {
                    tokens: self.burst,
                    last: now,
                }
            }
        };
        let allowed = bucket.tokens >= 1.0;
        let bucket = Bucket {
            tokens: if allowed {
                bucket.tokens - 1.0
            } else {
                bucket.tokens
            },
            ..bucket
        };
        self.buckets.insert(source, bucket);
        self.by_age.insert((bucket.last, source));
        allowed
    }

    /// The number of sources tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Whether `source` is tracked.
    pub fn tracks(&self, source: IpAddr) -> bool {
        self.buckets.contains_key(&source)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0xC612_0000 + n))
    }

    #[test]
    fn defaults_are_valid() {
        let limits = Limits::default();
        assert_eq!(limits.validate(), Ok(()));
        assert_eq!(limits.max_request_bytes, 8192);
        assert_eq!(limits.max_output_bytes, 1 << 20);
    }

    #[test]
    fn validate_names_the_field() {
        let cases: Vec<(Limits, &str)> = vec![
            (
                Limits {
                    max_request_bytes: 10,
                    ..Limits::default()
                },
                "max_request_bytes",
            ),
            (
                Limits {
                    max_headers: 0,
                    ..Limits::default()
                },
                "max_headers",
            ),
            (
                Limits {
                    header_timeout: Duration::ZERO,
                    ..Limits::default()
                },
                "header_timeout",
            ),
            (
                Limits {
                    silent_timeout: Duration::ZERO,
                    ..Limits::default()
                },
                "silent_timeout",
            ),
            (
                Limits {
                    max_silent_connections: 0,
                    ..Limits::default()
                },
                "max_silent_connections",
            ),
            (
                Limits {
                    requests_per_second_per_source: f64::NAN,
                    ..Limits::default()
                },
                "requests_per_second_per_source",
            ),
            (
                Limits {
                    burst_per_source: 0,
                    ..Limits::default()
                },
                "burst_per_source",
            ),
            (
                Limits {
                    max_output_bytes: 100,
                    ..Limits::default()
                },
                "max_output_bytes",
            ),
        ];
        for (limits, field) in cases {
            let error = limits.validate().expect_err(field);
            assert!(error.to_string().contains(field), "{error}");
        }
    }

    #[test]
    fn burst_then_refuse_then_refill() {
        let limits = Limits {
            requests_per_second_per_source: 10.0,
            burst_per_source: 5,
            ..Limits::default()
        };
        let mut limiter = RateLimiter::new(&limits);
        // Any instant will do as the origin: the time goes on only as the code advances it.
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(limiter.allow(t0, ip(1)), "request {i} of the burst");
        }
        assert!(!limiter.allow(t0, ip(1)), "over the burst");
        // Another source is not affected.
        assert!(limiter.allow(t0, ip(2)));
        // 10/s: one token per 100 ms.
        assert!(!limiter.allow(t0 + Duration::from_millis(50), ip(1)));
        assert!(limiter.allow(t0 + Duration::from_millis(110), ip(1)));
        assert!(!limiter.allow(t0 + Duration::from_millis(120), ip(1)));
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(limiter.allow(later, ip(1)));
        }
        assert!(!limiter.allow(later, ip(1)));
        // A clock going back neither panics nor refills.
        assert!(!limiter.allow(t0, ip(1)));
    }

    #[test]
    fn bounded_table_evicts_the_stalest() {
        let limits = Limits {
            burst_per_source: 1,
            ..Limits::default()
        };
        let mut limiter = RateLimiter::with_capacity(&limits, 3);
        // Any instant will do as the origin: the time goes on only as the code advances it.
        #[allow(clippy::disallowed_methods)]
        let t0 = Instant::now();
        for n in 0..3 {
            assert!(limiter.allow(t0 + Duration::from_millis(n.into()), ip(n)));
        }
        // Source 0 asks again (refused, but now the most recent).
        assert!(!limiter.allow(t0 + Duration::from_millis(3), ip(0)));
        // A fourth source evicts source 1, the stalest.
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(limiter.allow(t0 + Duration::from_millis(4), v6));
        assert_eq!(limiter.len(), 3);
        assert!(!limiter.tracks(ip(1)));
        assert!(limiter.tracks(ip(0)) && limiter.tracks(ip(2)) && limiter.tracks(v6));
        // Many more sources: the table stays bounded.
        for n in 10..1000 {
            limiter.allow(t0 + Duration::from_millis(5), ip(n));
        }
        assert_eq!(limiter.len(), 3);
        assert_eq!(limiter.by_age.len(), 3);
    }
}

/// The serde form of the library's configurations, as configuration files write them.
#[cfg(test)]
mod serde_form_tests {
    use std::time::Duration;

    use super::Limits;
    use crate::session::SenderConfig;

    #[test]
    fn an_empty_table_is_the_default_and_durations_are_milliseconds() {
        let limits: Limits = serde_json::from_str("{}").unwrap();
        assert_eq!(limits, Limits::default());
        let limits: Limits =
            serde_json::from_str(r#"{"header_timeout_ms": 250, "max_connections": 9}"#).unwrap();
        assert_eq!(limits.header_timeout, Duration::from_millis(250));
        assert_eq!(limits.max_connections, 9);
        assert_eq!(limits.idle_timeout, Limits::default().idle_timeout);
        let limits: Limits =
            serde_json::from_str(r#"{"silent_timeout_ms": 300, "max_silent_connections": 4}"#)
                .unwrap();
        assert_eq!(limits.silent_timeout, Duration::from_millis(300));
        assert_eq!(limits.max_silent_connections, 4);
        assert_eq!(limits.max_connections, Limits::default().max_connections);

        let sender: SenderConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(sender, SenderConfig::default());
        let sender: SenderConfig = serde_json::from_str(
            r#"{"heartbeat_min_ms": 20, "grtt": {"initial_ms": 30},
                "aggregator": {"hold_off_ms": 7, "repair_rate": 5.5},
                "proactive": {"target_fraction": 0.1}}"#,
        )
        .unwrap();
        assert_eq!(sender.heartbeat_min, Duration::from_millis(20));
        assert_eq!(sender.grtt.initial, Duration::from_millis(30));
        assert_eq!(sender.aggregator.hold_off, Duration::from_millis(7));
        assert_eq!(sender.aggregator.repair_rate, 5.5);
        assert_eq!(sender.proactive.target_fraction, 0.1);
        assert_eq!(sender.burst, SenderConfig::default().burst);
        sender.validate().unwrap();
    }

    #[test]
    fn the_serde_form_round_trips_and_refuses_unknown_keys() {
        let sender = SenderConfig::default();
        let text = serde_json::to_string(&sender).unwrap();
        assert!(text.contains("\"heartbeat_max_ms\":30000"), "{text}");
        assert_eq!(serde_json::from_str::<SenderConfig>(&text).unwrap(), sender);
        let limits = Limits::default();
        let text = serde_json::to_string(&limits).unwrap();
        assert_eq!(serde_json::from_str::<Limits>(&text).unwrap(), limits);
        for (text, key) in [
            (r#"{"heartbeat_min": 20}"#, "heartbeat_min"),
            (r#"{"grtt": {"initial": 30}}"#, "initial"),
            (r#"{"aggregator": {"hold_off_ms": 1, "typo": 2}}"#, "typo"),
        ] {
            let error = serde_json::from_str::<SenderConfig>(text).unwrap_err();
            assert!(error.to_string().contains(&format!("`{key}`")), "{error}");
        }
        let error = serde_json::from_str::<Limits>(r#"{"idle_timeout": 1}"#).unwrap_err();
        assert!(error.to_string().contains("`idle_timeout`"), "{error}");
    }

    #[test]
    fn validate_checks_what_was_read() {
        for (text, field) in [
            (r#"{"repair_window": 65}"#, "repair_window"),
            (r#"{"heartbeat_max_ms": 0}"#, "heartbeat_max"),
            (r#"{"backoff_factor": 17}"#, "backoff_factor"),
        ] {
            let sender: SenderConfig = serde_json::from_str(text).unwrap();
            let error = sender.validate().unwrap_err();
            assert!(
                matches!(error, crate::session::ConfigError::Invalid { field: f, .. } if f == field),
                "{text}: {error}"
            );
        }
        let sender: SenderConfig = serde_json::from_str(r#"{"grtt": {"initial_ms": 0}}"#).unwrap();
        assert!(sender.validate().is_err());
        let limits: Limits = serde_json::from_str(r#"{"header_timeout_ms": 0}"#).unwrap();
        assert!(limits.validate().is_err());
        let limits: Limits = serde_json::from_str(r#"{"silent_timeout_ms": 0}"#).unwrap();
        assert!(limits.validate().is_err());
    }
}
