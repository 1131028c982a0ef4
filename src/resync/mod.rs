//! What resync needs on the GCKS side: the durable state a restarted GCKS resumes from and
//! serves resync out of ([`store`]). The TCP and HTTP endpoints that serve it come with
//! issue 10's endpoints; resync data is only ever what is already signed and encrypted.

pub mod store;
