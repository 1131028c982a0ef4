//! One signed message in the form it is stored and served in: everything a sender needs to
//! send it or serve it again ([`StoredMessage`]). The engine writes it to files; a relay
//! session and the resync handlers read it.

use serde::{Deserialize, Serialize};

use super::sender::{PreparedMessage, QueueError};

/// One signed message as stored: everything the sender needs to send or serve it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Its sequence number.
    pub seq: u64,
    /// Its datagram MAC key.
    pub mac_key: [u8; 32],
    /// Its signed manifest.
    pub manifest: Vec<u8>,
    /// Its FEC source symbols (the chunks, each padded to the symbol size), concatenated.
    pub symbols: Vec<u8>,
}

impl StoredMessage {
    /// The stored form of a prepared message.
    pub fn from_prepared(message: &PreparedMessage) -> Self {
        let (seq, mac_key, manifest, symbols) = message.parts();
        Self {
            seq,
            mac_key,
            manifest: manifest.to_vec(),
            symbols: symbols.to_vec(),
        }
    }

    /// The prepared message again (FEC encoder and chunk index rebuilt).
    pub fn to_prepared(&self) -> Result<PreparedMessage, QueueError> {
        PreparedMessage::from_parts(
            crate::auth::mac::MacKey::from_bytes(self.mac_key),
            self.manifest.clone(),
            self.symbols.clone(),
        )
    }
}
