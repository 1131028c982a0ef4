//! Resync: the sans-IO resync endpoints (re-exported from `rekeycast-proto`: the connection
//! core [`connection`] with its codecs [`http`] and [`tcp`], [`limits`], [`ResyncSource`]) and
//! the durable state they serve from: a GCKS's key tree and history of signed messages
//! ([`store`]), the journal that keeps a GCKS's acknowledged leaves across a crash
//! ([`journal`]), and a relay's history ([`relay_store`]).

pub use rekeycast_proto::resync::*;

pub mod journal;
pub mod relay_store;
pub mod store;
