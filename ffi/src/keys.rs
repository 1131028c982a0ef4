//! The traffic keys a member holds for its product: the Data SA in force and the one before
//! it (traffic protected under the old key may still arrive after a rekey), zeroized when
//! dropped, with the instant each was installed so that its expiry can be announced.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rekeycast_proto::gsa::DataSa;
use zeroize::Zeroizing;

use crate::{rkc_result, RKC_KEY_LEN};

/// Data SAs kept: the one in force and the previous one.
const KEPT: usize = 2;

/// One installed Data SA.
struct Installed {
    spi: u32,
    key: Zeroizing<[u8; RKC_KEY_LEN]>,
    /// When the member should hear that it expires soon; `None` once told.
    warn_at: Option<Instant>,
    expires_at: Instant,
}

/// The member's traffic keys.
pub(crate) struct KeyStore {
    installed: VecDeque<Installed>,
    /// How long before its expiry a key is announced as expiring.
    warning: Duration,
}

/// A key whose expiry is near: its SPI and the whole seconds it has left.
pub(crate) struct Expiring {
    pub(crate) spi: u32,
    pub(crate) seconds_left: u32,
}

impl KeyStore {
    pub(crate) fn new(warning: Duration) -> Self {
        Self {
            installed: VecDeque::with_capacity(KEPT + 1),
            warning,
        }
    }

    /// Installs `data_sa` at `now`; the oldest key beyond [`KEPT`] is dropped (and zeroized).
    /// A Data SA announced again (a resumed session) replaces its earlier copy.
    pub(crate) fn install(&mut self, now: Instant, data_sa: &DataSa) {
        self.installed.retain(|sa| sa.spi != data_sa.spi);
        let lifetime = Duration::from_secs(u64::from(data_sa.lifetime_secs));
        let expires_at = now + lifetime;
        let warn_at = expires_at
            .checked_sub(self.warning)
            .map_or(now, |at| at.max(now));
        // Only the newest key is announced: the older ones are superseded.
        for older in &mut self.installed {
            older.warn_at = None;
        }
        self.installed.push_back(Installed {
            spi: data_sa.spi,
            key: Zeroizing::new(*data_sa.tek.as_bytes()),
            warn_at: Some(warn_at),
            expires_at,
        });
        while self.installed.len() > KEPT {
            self.installed.pop_front();
        }
    }

    /// When [`Self::poll_expiring`] next has something to say.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.installed.iter().filter_map(|sa| sa.warn_at).min()
    }

    /// The key whose warning time has come at `now`, once.
    pub(crate) fn poll_expiring(&mut self, now: Instant) -> Option<Expiring> {
        let sa = self
            .installed
            .iter_mut()
            .find(|sa| sa.warn_at.is_some_and(|at| at <= now))?;
        sa.warn_at = None;
        let left = sa.expires_at.saturating_duration_since(now).as_secs();
        Some(Expiring {
            spi: sa.spi,
            seconds_left: u32::try_from(left).unwrap_or(u32::MAX),
        })
    }

    /// Copies the key of the Data SA `spi` into `out`.
    pub(crate) fn copy_key(&self, spi: u32, out: &mut [u8]) -> Result<(), rkc_result> {
        let sa = self
            .installed
            .iter()
            .find(|sa| sa.spi == spi)
            .ok_or(rkc_result::RKC_NOT_FOUND)?;
        let out = out
            .get_mut(..RKC_KEY_LEN)
            .ok_or(rkc_result::RKC_BUFFER_TOO_SHORT)?;
        out.copy_from_slice(sa.key.as_slice());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rekeycast_proto::gsa::Tek;

    use super::*;

    fn data_sa(spi: u32, lifetime_secs: u32, byte: u8) -> DataSa {
        DataSa {
            spi,
            lifetime_secs,
            timing: Default::default(),
            next_spi: spi + 1,
            tek: Tek::from_bytes([byte; 32]),
        }
    }

    #[test]
    fn keeps_the_key_in_force_and_the_previous_one() {
        let now = Instant::now();
        let mut store = KeyStore::new(Duration::from_secs(10));
        store.install(now, &data_sa(1, 3600, 1));
        store.install(now, &data_sa(2, 3600, 2));
        store.install(now, &data_sa(3, 3600, 3));
        let mut out = [0u8; 32];
        assert_eq!(store.copy_key(1, &mut out), Err(rkc_result::RKC_NOT_FOUND));
        assert_eq!(store.copy_key(2, &mut out), Ok(()));
        assert_eq!(out, [2; 32]);
        let mut short = [0u8; 31];
        assert_eq!(
            store.copy_key(3, &mut short),
            Err(rkc_result::RKC_BUFFER_TOO_SHORT)
        );
        assert_eq!(short, [0; 31], "nothing written on failure");
    }

    #[test]
    fn announces_only_the_newest_key_once_before_it_expires() {
        let now = Instant::now();
        let mut store = KeyStore::new(Duration::from_secs(10));
        store.install(now, &data_sa(1, 60, 1));
        store.install(now, &data_sa(2, 60, 2));
        assert_eq!(store.deadline(), Some(now + Duration::from_secs(50)));
        assert!(store.poll_expiring(now + Duration::from_secs(49)).is_none());
        let expiring = store.poll_expiring(now + Duration::from_secs(50));
        assert_eq!(expiring.map(|e| (e.spi, e.seconds_left)), Some((2, 10)));
        assert!(store.poll_expiring(now + Duration::from_secs(55)).is_none());
        assert_eq!(store.deadline(), None);
    }
}
