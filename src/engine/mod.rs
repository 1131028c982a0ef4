//! The engines a product embeds: one generic [`driver::Driver`] that runs any sans-IO
//! [`Endpoint`](rekeycast_proto::endpoint::Endpoint) (a GCKS, a member, a relay) over real
//! sockets, threads and files, and the thin handles over it.
//!
//! The driver owns everything that is I/O and written once for every endpoint: the mio poll
//! and its waker, the sockets of the endpoint's ports, deadlines and the loop-lag histogram,
//! GSO batching and the send backlog, the per-source rate limit on feedback, the receive
//! filter, the worker pool that runs jobs, the storage thread that makes store operations
//! durable, the fetch threads that stream resync answers back, the resync server, the event
//! policy (bounded, drop-and-count) and the logs. An endpoint decides; the driver carries out.

pub mod driver;
pub mod gcks;
pub mod member;

pub use driver::{
    bounded_events, ChannelSink, Control, Delivery, Driver, DriverConfig, DriverError,
    DriverHandle, DriverStats, EventSink, FeedbackLimit, LocalAddrs, LoopLag, ReceiveFilter,
    SenderPort,
};

pub mod relay;
pub use relay::{Relay, RelayBuilder, RelayEngineConfig, RelayEngineError, RelayStats};
