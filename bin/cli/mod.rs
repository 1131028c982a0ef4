//! The subcommands of `rekeycast`, one module each, and the pieces they share.

pub mod admin;
pub mod bundle;
pub mod chart;
pub mod demo;
pub mod logging;
pub mod loss;
pub mod member;
pub mod server;
pub mod shutdown;
pub mod sim;

/// Microseconds as milliseconds, for display and reports.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The socket options of a multicast group from a configuration file's `[group]`.
pub fn multicast_config(
    group: &rekeycast::config::GroupConfig,
) -> anyhow::Result<rekeycast::io::socket::MulticastConfig> {
    use rekeycast::config::MulticastInterface;
    use rekeycast::io::socket::{Interface, MulticastConfig};

    let mut multicast = MulticastConfig::new(group.multicast);
    multicast.interface = match group.multicast_interface()? {
        MulticastInterface::V4(address) if address.is_unspecified() => Interface::Default,
        MulticastInterface::V4(address) => Interface::V4(address),
        MulticastInterface::V6(0) => Interface::Default,
        MulticastInterface::V6(index) => Interface::V6(index),
    };
    multicast.ttl = group.ttl;
    multicast.loopback = group.loopback;
    Ok(multicast)
}
