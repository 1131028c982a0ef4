//! Relays: the sans-IO relay session (re-exported from `rekeycast-proto`: [`RelaySession`],
//! its configuration, events and counters) and [`Relay`], the engine that runs one over real
//! sockets (what the `rekey-relay` binary runs).

pub use rekeycast_proto::relay::*;

mod engine;
pub use engine::{Relay, RelayEngineConfig, RelayEngineError, RelayStats};
