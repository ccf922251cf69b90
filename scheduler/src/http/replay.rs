//! The memory of nonces that makes a signed request count once: each accepted
//! nonce is kept until its request is too old to be accepted anyway. Bounded; full,
//! it refuses rather than forgets.

use std::collections::{HashMap, VecDeque};

use aigrid_api::signature::MAX_CLOCK_SKEW_SECS;
use parking_lot::Mutex;

/// Nonces remembered at most; beyond it new signed requests are refused (429) until
/// old ones age out, rather than forgetting nonces that could then be replayed.
pub const MAX_NONCES: usize = 2_000_000;

/// The nonces of requests accepted within the clock-skew window, so each is
/// accepted once. A nonce is remembered until its request's `created` is too old to
/// be accepted anyway.
#[derive(Debug, Default)]
pub struct NonceCache {
    inner: Mutex<Nonces>,
}

#[derive(Debug, Default)]
struct Nonces {
    /// `blake3(key id, nonce)` → the signature's `created`.
    seen: HashMap<[u8; 16], u64>,
    /// The same, in the order they were accepted, for expiry.
    order: VecDeque<([u8; 16], u64)>,
}

/// Why a nonce was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum NonceError {
    /// Seen before.
    Replayed,
    /// The cache is full of nonces still in their window.
    Full,
}

impl NonceCache {
    /// Remembers `nonce` of `key_id`, signed at `created`, at time `now` (Unix
    /// seconds); refuses one seen before.
    pub fn accept(
        &self,
        key_id: &str,
        nonce: &str,
        created: u64,
        now: u64,
    ) -> Result<(), NonceError> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(key_id.as_bytes());
        hasher.update(&[0]);
        hasher.update(nonce.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        let mut n = self.inner.lock();
        // Forget what can no longer be accepted: created more than the skew ago. The
        // queue is in acceptance order, not `created` order, so stop at the first
        // entry still valid and let later ones wait their turn; the check below uses
        // the map, which holds exactly the entries not yet expired from the queue.
        while let Some(&(old, old_created)) = n.order.front() {
            if old_created.saturating_add(MAX_CLOCK_SKEW_SECS) >= now {
                break;
            }
            n.order.pop_front();
            n.seen.remove(&old);
        }
        if n.seen.contains_key(&id) {
            return Err(NonceError::Replayed);
        }
        if n.seen.len() >= MAX_NONCES {
            return Err(NonceError::Full);
        }
        n.seen.insert(id, created);
        n.order.push_back((id, created));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_accepted_once_within_the_window() {
        let cache = NonceCache::default();
        cache.accept("k", "n1", 1000, 1000).unwrap();
        assert_eq!(
            cache.accept("k", "n1", 1000, 1001),
            Err(NonceError::Replayed)
        );
        // Another key may use the same nonce.
        cache.accept("k2", "n1", 1000, 1001).unwrap();
        // Once the request is too old to be accepted at all, its nonce is forgotten
        // (the signature check refuses it by then).
        cache
            .accept(
                "k",
                "n2",
                1000 + MAX_CLOCK_SKEW_SECS + 2,
                1000 + MAX_CLOCK_SKEW_SECS + 2,
            )
            .unwrap();
        assert!(!cache.inner.lock().seen.is_empty());
        assert_eq!(cache.inner.lock().seen.len(), 1);
    }
}
