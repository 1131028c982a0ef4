//! Serde's form of a configuration's durations: a whole number of milliseconds, in a field
//! whose name ends in `_ms` (`#[serde(rename = "hold_off_ms", with = "duration_ms")]`), as
//! configuration files write them. A duration is written rounded down to the millisecond, and
//! read exactly; a count of milliseconds too large for a `u64` is written as `u64::MAX`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes `duration` as whole milliseconds.
pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// Reads a whole number of milliseconds.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_millis)
}
