//! Relays: the sans-IO relay session (re-exported from `rekeycast-proto`: [`RelaySession`],
//! its configuration, events and counters) and [`Relay`], the engine that runs one over real
//! sockets (what the `rekey-relay` binary runs; defined in [`crate::engine::relay`]).

pub use rekeycast_proto::relay::*;

pub mod directory;

pub use crate::engine::relay::{
    Relay, RelayBuilder, RelayEngineConfig, RelayEngineError, RelayStats,
};
