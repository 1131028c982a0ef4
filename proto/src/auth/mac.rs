//! The datagram MAC: a 16-byte BLAKE3 keyed hash over a datagram's header and body.
//!
//! Every datagram of a group (symbols, NACKs, heartbeats, probe replies) carries this tag in
//! its trailer (see [`crate::wire`]), under the MAC key of the rekey message its header's
//! sequence number names. Checking it costs about as much as hashing the datagram once, so a
//! member drops outsiders' traffic before it does anything expensive: no signature is ever
//! verified for a datagram whose MAC failed (DESIGN.md, security rules). The MAC key of
//! message s comes from the group key that message s-1 produced (the key tree derives it); a
//! member ejected in message s can still MAC message s but nothing after it, and any current
//! member can MAC anything of its group: a group MAC keeps outsiders out, not insiders.

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::wire::datagram::{Packet, MAC_LEN};

/// A datagram MAC key (32 bytes, the key of BLAKE3's keyed mode). Zeroized on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct MacKey([u8; 32]);

impl MacKey {
    /// Wraps 32 bytes of key material.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The tag of `authenticated` (a datagram's header and body).
    pub fn tag(&self, authenticated: &[u8]) -> [u8; MAC_LEN] {
        let hash = blake3::keyed_hash(&self.0, authenticated);
        let mut tag = [0u8; MAC_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..MAC_LEN]);
        tag
    }

    /// Computes the tag of an emitted datagram and writes it into its trailer.
    pub fn seal<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let tag = self.tag(packet.authenticated());
        packet.set_mac(&tag);
    }

    /// Whether the datagram's trailer is the right tag, compared in constant time.
    pub fn check<T: AsRef<[u8]>>(&self, packet: &Packet<T>) -> bool {
        let tag = self.tag(packet.authenticated());
        constant_time_eq::constant_time_eq(&tag, &packet.mac())
    }
}

impl core::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Key material is never printed.
        f.write_str("MacKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{BodyRepr, DatagramRepr, ObjectKind, SymbolRepr};

    fn emitted() -> Vec<u8> {
        let repr = DatagramRepr {
            group_id: 9,
            spi: 1,
            seq: 5,
            body: BodyRepr::Symbol(SymbolRepr {
                object: ObjectKind::Chunks,
                sbn: 0,
                esi: 3,
                data: b"chunk bytes",
            }),
            mac: [0; MAC_LEN],
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut buf).unwrap();
        buf
    }

    #[test]
    fn sealed_datagram_checks_and_matches_blake3() {
        let key = MacKey::from_bytes([7; 32]);
        let mut buf = emitted();
        let mut packet = Packet::new_checked(&mut buf[..]).unwrap();
        key.seal(&mut packet);
        assert!(key.check(&packet));
        let expected = blake3::keyed_hash(&[7; 32], packet.authenticated());
        assert_eq!(packet.mac(), expected.as_bytes()[..16]);
    }

    #[test]
    fn every_bit_flip_and_other_keys_fail() {
        let key = MacKey::from_bytes([7; 32]);
        let mut buf = emitted();
        key.seal(&mut Packet::new_checked(&mut buf[..]).unwrap());
        for bit in 0..buf.len() * 8 {
            let mut flipped = buf.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            if let Ok(packet) = Packet::new_checked(&flipped[..]) {
                assert!(!key.check(&packet), "flip of bit {bit} passed the MAC");
            }
        }
        let other = MacKey::from_bytes([8; 32]);
        assert!(!other.check(&Packet::new_checked(&buf[..]).unwrap()));
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", MacKey::from_bytes([1; 32])), "MacKey(..)");
    }
}
