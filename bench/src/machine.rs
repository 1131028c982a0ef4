//! What the end-to-end benches print beside their figures: the machine's load, and
//! durations in milliseconds.

use std::time::Duration;

/// The 1, 5 and 15 minute load averages, or nothing where /proc/loadavg cannot be read.
pub fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .filter_map(|field| field.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The load averages as text, "unknown" when there are none.
pub fn format_load(load: &[f64]) -> String {
    if load.is_empty() {
        return "unknown".into();
    }
    load.iter()
        .map(|l| format!("{l:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A duration in milliseconds.
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
