//! Impairments of the userspace switch: their TOML configuration and a sans-IO, seeded engine
//! that decides the fate of each frame.
//!
//! This module owns the switch's configuration types ([`SwitchConfig`], [`PortConfig`],
//! [`Impairment`] and its parts) and the per-port, per-direction decision of what happens to a
//! frame: dropped (and why), or delivered at one or two times, possibly corrupted. It has no
//! sockets, threads or clock: time is always an argument, counted from the switch's start, and
//! every random draw comes from a ChaCha8 generator seeded from `(seed, port index,
//! direction)`, so the same inputs give the same fates.
//!
//! A scenario file names impairments like this (every field optional, absent means none):
//!
//! ```toml
//! seed = 7
//! counters_path = "/tmp/counters.json"
//!
//! [[port]]
//! name = "h1"
//! ifname = "rkc123p1b"
//! ingress = { loss = { model = "iid", p = 0.2 } }
//!
//! [[port]]
//! name = "h2"
//! ifname = "rkc123p2b"
//!
//! [port.egress]
//! loss = { model = "gilbert_elliott", average = 0.05, mean_burst = 4.0 }
//! delay_ms = 20
//! jitter_ms = 5
//! reorder = { p = 0.01, extra_delay_ms = 10 }
//! duplicate = { p = 0.01 }
//! corrupt = { p = 0.001 }
//! rate = { bits_per_second = 10_000_000, burst_bytes = 30_000 }
//! outages = [{ from_ms = 5_000, to_ms = 7_000 }]
//! ```
//!
//! Ingress is the direction from the host into the switch (frames the host sends), egress the
//! direction from the switch to the host (frames the host receives). A frame crossing the
//! switch from port A to port B goes through A's ingress impairments, then B's egress
//! impairments.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The configuration of one switch process (`rekeycast-netns switch --config FILE.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// The seed of every random draw of the switch; each port and direction derives its own
    /// generator from it, so runs with the same seed and the same traffic see the same fates.
    #[serde(default)]
    pub seed: u64,
    /// Where the switch writes its counters as one JSON object, every 500 ms and on exit
    /// (written to a temporary file beside it, then renamed). None: only on the `counters`
    /// command.
    #[serde(default)]
    pub counters_path: Option<PathBuf>,
    /// The most frames waiting in the delay queue at once; frames beyond it are dropped and
    /// counted as `queue_overflow`. Defaults to [`SwitchConfig::DEFAULT_QUEUE_CAPACITY`].
    #[serde(default = "SwitchConfig::default_queue_capacity")]
    pub queue_capacity: usize,
    /// The switch's ports, in order; a port's index in this list is its index in the seeds and
    /// counters. Written `[[port]]` in TOML.
    #[serde(rename = "port", default)]
    pub ports: Vec<PortConfig>,
}

impl SwitchConfig {
    /// The default of [`SwitchConfig::queue_capacity`]: 65,536 frames (at most about 100 MB of
    /// full-size frames).
    pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;

    fn default_queue_capacity() -> usize {
        Self::DEFAULT_QUEUE_CAPACITY
    }

    /// Parses a configuration from TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Toml {
            message: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|error| match error {
            ConfigError::Toml { message } => ConfigError::Toml {
                message: format!("{}: {message}", path.display()),
            },
            other => other,
        })
    }

    /// The configuration as TOML text (what a scenario runner writes for the switch).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|error| ConfigError::Toml {
            message: error.to_string(),
        })
    }

    /// Checks every port: at least one, unique names and interfaces, interface names of at
    /// most 15 bytes, a non-zero queue capacity, and valid impairments.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ports.is_empty() {
            return Err(ConfigError::NoPorts);
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::Invalid {
                field: "queue_capacity".into(),
                reason: "must be at least 1".into(),
            });
        }
        for (index, port) in self.ports.iter().enumerate() {
            if port.ifname.is_empty() || port.ifname.len() > 15 {
                return Err(ConfigError::Invalid {
                    field: format!("port[{index}].ifname"),
                    reason: format!("{:?} must be 1 to 15 bytes", port.ifname),
                });
            }
            for other in &self.ports[..index] {
                if other.name == port.name {
                    return Err(ConfigError::Invalid {
                        field: format!("port[{index}].name"),
                        reason: format!("{:?} is used by another port", port.name),
                    });
                }
                if other.ifname == port.ifname {
                    return Err(ConfigError::Invalid {
                        field: format!("port[{index}].ifname"),
                        reason: format!("{:?} is used by another port", port.ifname),
                    });
                }
            }
            port.ingress.validate(&format!("port[{index}].ingress"))?;
            port.egress.validate(&format!("port[{index}].egress"))?;
        }
        Ok(())
    }
}

/// One port of the switch: an interface in the switch's namespace (the switch's end of a veth
/// pair whose other end is in a host's namespace) and its impairments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    /// The port's name in commands (`outage NAME 2000`) and counters, usually the host's.
    pub name: String,
    /// The interface the port opens, in the switch's namespace.
    pub ifname: String,
    /// Impairments of frames from the host into the switch.
    #[serde(default)]
    pub ingress: Impairment,
    /// Impairments of frames from the switch to the host.
    #[serde(default)]
    pub egress: Impairment,
}

/// The impairments of one direction of one port. The default impairs nothing.
///
/// They apply in this order: an outage drops the frame; then the rate limit (the frame's bytes
/// must fit the token bucket); then loss; then corruption and duplication are decided; then
/// the delivery time: delay plus jitter, plus the reordering delay for the frames chosen to be
/// reordered. A duplicate gets its own jitter, so it may arrive before or after the original.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Impairment {
    /// How frames are lost.
    pub loss: Loss,
    /// The base one-way delay added to every frame, in milliseconds.
    pub delay_ms: u64,
    /// Jitter: each frame's delay is drawn uniformly from `delay_ms - jitter_ms ..= delay_ms +
    /// jitter_ms` milliseconds (at microsecond granularity), clamped at zero. Jitter larger
    /// than the spacing of frames reorders them too.
    pub jitter_ms: u64,
    /// Deliberate reordering: frames held back so later ones overtake them.
    pub reorder: Option<Reorder>,
    /// Duplication: frames delivered twice.
    pub duplicate: Option<Duplicate>,
    /// Corruption: one bit of a UDP payload flipped, checksums made valid again.
    pub corrupt: Option<Corrupt>,
    /// A token-bucket rate limit; frames beyond it are dropped.
    pub rate: Option<Rate>,
    /// Windows during which the direction is blackholed, in milliseconds since the switch
    /// started.
    pub outages: Vec<Outage>,
}

impl Impairment {
    /// Whether this impairs nothing at all (frames pass at once, untouched).
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// Checks every probability is within 0 to 1, the Gilbert-Elliott parameters are
    /// reachable, the rate is positive and every outage ends after it starts. `field` names
    /// this impairment in errors.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let invalid = |name: &str, reason: String| ConfigError::Invalid {
            field: format!("{field}.{name}"),
            reason,
        };
        let probability = |name: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(invalid(name, format!("{p} is not a probability (0 to 1)")))
            }
        };
        match self.loss {
            Loss::None => {}
            Loss::Iid { p } => probability("loss.p", p)?,
            Loss::GilbertElliott {
                average,
                mean_burst,
            } => {
                if !(0.0..1.0).contains(&average) {
                    return Err(invalid(
                        "loss.average",
                        format!("{average} must be at least 0 and below 1"),
                    ));
                }
                if !(mean_burst >= 1.0 && mean_burst.is_finite()) {
                    return Err(invalid(
                        "loss.mean_burst",
                        format!("{mean_burst} must be a finite number of frames, at least 1"),
                    ));
                }
                // The good-to-bad probability average / (mean_burst (1 - average)) must not
                // exceed 1 (see GilbertElliott::transitions).
                let limit = mean_burst / (1.0 + mean_burst);
                if average > limit {
                    return Err(invalid(
                        "loss.average",
                        format!(
                            "{average} is unreachable with bursts of mean {mean_burst} frames \
                             (at most {limit:.4}: good runs cannot be shorter than one frame)"
                        ),
                    ));
                }
            }
        }
        if let Some(reorder) = &self.reorder {
            probability("reorder.p", reorder.p)?;
        }
        if let Some(duplicate) = &self.duplicate {
            probability("duplicate.p", duplicate.p)?;
        }
        if let Some(corrupt) = &self.corrupt {
            probability("corrupt.p", corrupt.p)?;
        }
        if let Some(rate) = &self.rate {
            if rate.bits_per_second == 0 {
                return Err(invalid("rate.bits_per_second", "must be above 0".into()));
            }
            if rate.burst_bytes == 0 {
                return Err(invalid("rate.burst_bytes", "must be above 0".into()));
            }
        }
        for (index, outage) in self.outages.iter().enumerate() {
            if outage.to_ms <= outage.from_ms {
                return Err(invalid(
                    &format!("outages[{index}]"),
                    format!(
                        "ends ({} ms) before or when it starts ({} ms)",
                        outage.to_ms, outage.from_ms
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A loss model, written as a table tagged by `model`: `{ model = "none" }`, `{ model = "iid",
/// p = 0.1 }` or `{ model = "gilbert_elliott", average = 0.05, mean_burst = 4.0 }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum Loss {
    /// No loss.
    #[default]
    None,
    /// Each frame is lost independently with probability `p`.
    Iid {
        /// The loss probability, 0 to 1.
        p: f64,
    },
    /// Bursty loss: a two-state Markov chain, every frame lost in the bad state and none in
    /// the good state, stepped once per frame. With `r` the bad-to-good and `p` the
    /// good-to-bad probability, a burst lasts `1 / r` frames on average and the chain is bad
    /// a fraction `p / (p + r)` of the time, so `r = 1 / mean_burst` and `p = average / (
    /// mean_burst (1 - average))`, which must not exceed 1: `average <= mean_burst / (1 +
    /// mean_burst)`.
    GilbertElliott {
        /// The long-run fraction of frames lost, at least 0 and below 1.
        average: f64,
        /// The mean length of a run of lost frames, at least 1.
        mean_burst: f64,
    },
}

/// Reordering: each frame is, with probability `p`, held `extra_delay_ms` longer than its delay,
/// so the frames behind it overtake it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reorder {
    /// The probability that a frame is held back, 0 to 1.
    pub p: f64,
    /// How much longer it is held, in milliseconds.
    pub extra_delay_ms: u64,
}

/// Duplication: each frame is, with probability `p`, delivered twice.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Duplicate {
    /// The probability that a frame is duplicated, 0 to 1.
    pub p: f64,
}

/// Corruption: each UDP-over-IPv4 frame is, with probability `p`, delivered with one random
/// bit of its UDP payload flipped and its UDP checksum recomputed, so the receiving
/// application sees the corrupted bytes instead of the kernel discarding them. Other frames
/// (ARP, non-UDP, IPv4 fragments, empty payloads) are never corrupted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corrupt {
    /// The probability that a UDP frame is corrupted, 0 to 1.
    pub p: f64,
}

/// A token-bucket rate limit on the frames' bytes (Ethernet header included, no preamble or
/// FCS): the bucket holds at most `burst_bytes` and fills at `bits_per_second / 8` bytes per
/// second; a frame passes when the bucket holds at least its length, which is then taken out,
/// and is dropped otherwise. `burst_bytes` below a frame's length drops every such frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// The sustained rate, in bits per second, above 0.
    pub bits_per_second: u64,
    /// The bucket's capacity in bytes, above 0 (and at least a full frame, 1,514, to let
    /// full frames through).
    pub burst_bytes: u64,
}

/// A window `[from_ms, to_ms)` of milliseconds since the switch started during which every
/// frame of the direction is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// When the outage starts.
    pub from_ms: u64,
    /// When it ends (exclusive), after `from_ms`.
    pub to_ms: u64,
}

/// The direction of a port that an impairment applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Frames from the host into the switch.
    Ingress,
    /// Frames from the switch to the host.
    Egress,
}

/// Why a switch configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read switch config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is not valid TOML for a [`SwitchConfig`].
    #[error("switch config is not valid: {message}")]
    Toml {
        /// The parser's message, with the file's name when read from a file.
        message: String,
    },
    /// The configuration has no port.
    #[error("switch config has no [[port]]")]
    NoPorts,
    /// A field holds a value out of its range.
    #[error("switch config field {field}: {reason}")]
    Invalid {
        /// The field, as a path (`port[1].egress.loss.p`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_example_parses() {
        let text = r#"
            seed = 7
            counters_path = "/tmp/counters.json"

            [[port]]
            name = "h1"
            ifname = "rkc123p1b"
            ingress = { loss = { model = "iid", p = 0.2 } }

            [[port]]
            name = "h2"
            ifname = "rkc123p2b"

            [port.egress]
            loss = { model = "gilbert_elliott", average = 0.05, mean_burst = 4.0 }
            delay_ms = 20
            jitter_ms = 5
            reorder = { p = 0.01, extra_delay_ms = 10 }
            duplicate = { p = 0.01 }
            corrupt = { p = 0.001 }
            rate = { bits_per_second = 10_000_000, burst_bytes = 30_000 }
            outages = [{ from_ms = 5_000, to_ms = 7_000 }]
        "#;
        let config = SwitchConfig::from_toml(text).expect("valid");
        assert_eq!(config.seed, 7);
        assert_eq!(config.ports.len(), 2);
        assert_eq!(config.ports[0].ingress.loss, Loss::Iid { p: 0.2 });
        assert!(config.ports[0].egress.is_none());
        assert!(config.ports[1].ingress.is_none());
        let egress = &config.ports[1].egress;
        assert_eq!(
            egress.loss,
            Loss::GilbertElliott {
                average: 0.05,
                mean_burst: 4.0
            }
        );
        assert_eq!(egress.delay_ms, 20);
        assert_eq!(
            egress.outages,
            vec![Outage {
                from_ms: 5000,
                to_ms: 7000
            }]
        );
        let again = SwitchConfig::from_toml(&config.to_toml().expect("serializes")).expect("valid");
        assert_eq!(again, config);
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field() {
        let cases = [
            ("", "no [[port]]"),
            (
                "[[port]]\nname='a'\nifname='x'\ningress={loss={model='iid',p=1.5}}",
                "port[0].ingress.loss.p",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\negress={loss={model='gilbert_elliott',\
                 average=0.9,mean_burst=2.0}}",
                "port[0].egress.loss.average",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\negress={outages=[{from_ms=5,to_ms=5}]}",
                "port[0].egress.outages[0]",
            ),
            (
                "[[port]]\nname='a'\nifname='x'\n[[port]]\nname='a'\nifname='y'",
                "port[1].name",
            ),
            (
                "[[port]]\nname='a'\nifname='0123456789abcdef'",
                "port[0].ifname",
            ),
            ("[[port]]\nname='a'\nifname='x'\nbogus=1", "bogus"),
        ];
        for (text, expected) in cases {
            let error = SwitchConfig::from_toml(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
