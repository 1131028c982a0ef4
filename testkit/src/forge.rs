//! Datagrams as an attacker makes them: sealed with a real MAC key (an insider), with a key
//! made up (an outsider), random bytes, and real datagrams with bits flipped.

use rand::Rng;
use rekeycast::auth::mac::MacKey;
use rekeycast::session::seal_into;
use rekeycast::wire::datagram::MAC_LEN;
use rekeycast::wire::{BodyRepr, DatagramRepr, ObjectKind, SymbolRepr};

/// The group and Rekey SA a datagram claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sa {
    /// The group id.
    pub group_id: u32,
    /// The Rekey SA's SPI.
    pub spi: u32,
}

impl Sa {
    /// Emits `body` for message `seq` and seals it with `key`, as the GCKS or an insider
    /// holding the key does.
    pub fn seal(&self, seq: u64, body: BodyRepr<'_>, key: &MacKey) -> Vec<u8> {
        let repr = DatagramRepr {
            group_id: self.group_id,
            spi: self.spi,
            seq,
            body,
            mac: [0; MAC_LEN],
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        let len = seal_into(&repr, key, &mut buf).unwrap();
        buf.truncate(len);
        buf
    }

    /// A symbol datagram (`object`, block `sbn`, symbol `esi`) sealed with `key`.
    pub fn seal_symbol(
        &self,
        seq: u64,
        object: ObjectKind,
        sbn: u8,
        esi: u32,
        data: &[u8],
        key: &MacKey,
    ) -> Vec<u8> {
        let symbol = SymbolRepr {
            object,
            sbn,
            esi,
            data,
        };
        self.seal(seq, BodyRepr::Symbol(symbol), key)
    }

    /// `body` for message `seq` sealed with a key drawn from `rng`, one nobody holds: it
    /// fails its MAC check.
    pub fn wrongly_keyed<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        seq: u64,
        body: BodyRepr<'_>,
    ) -> Vec<u8> {
        let key = MacKey::from_bytes(rng.gen());
        self.seal(seq, body, &key)
    }
}

/// Random bytes of a random length below `max_len`.
pub fn random_bytes<R: Rng + ?Sized>(rng: &mut R, max_len: usize) -> Vec<u8> {
    let len = rng.gen_range(0..max_len.max(1));
    (0..len).map(|_| rng.gen()).collect()
}

/// A copy of `datagram` with one to eight random bits flipped (an empty one stays empty).
pub fn flip_bits<R: Rng + ?Sized>(rng: &mut R, datagram: &[u8]) -> Vec<u8> {
    let mut bytes = datagram.to_vec();
    if bytes.is_empty() {
        return bytes;
    }
    for _ in 0..rng.gen_range(1..=8) {
        let bit = rng.gen_range(0..bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rekeycast::auth::datagram::DatagramVerifier;

    use super::*;

    const SA: Sa = Sa {
        group_id: 7,
        spi: 3,
    };

    #[test]
    fn sealed_datagrams_pass_the_verifier_and_forged_ones_do_not() {
        let key = MacKey::from_bytes([5; 32]);
        let mut verifier = DatagramVerifier::new(SA.group_id, SA.spi);
        verifier.add_key(1, key.clone());
        let real = SA.seal_symbol(1, ObjectKind::Chunks, 0, 2, b"data", &key);
        assert!(verifier.check(&real).is_ok());

        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let symbol = SymbolRepr {
            object: ObjectKind::Manifest,
            sbn: 0,
            esi: 0,
            data: b"data",
        };
        let forged = SA.wrongly_keyed(&mut rng, 1, BodyRepr::Symbol(symbol));
        assert_eq!(forged.len(), real.len());
        assert!(verifier.check(&forged).is_err());
        let flipped = flip_bits(&mut rng, &real);
        assert_ne!(flipped, real);
        assert!(verifier.check(&flipped).is_err());
        assert!(random_bytes(&mut rng, 10).len() < 10);
        assert!(flip_bits(&mut rng, &[]).is_empty());
    }
}
