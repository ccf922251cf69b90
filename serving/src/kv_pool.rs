//! The keys and values of every running sequence of a decoder: fixed slots in one
//! pool per layer, a slot per sequence from admission to its end. The decoder
//! ([`crate::model::Decoder`]) makes the pool to its shape and writes and reads it.

use candle_core::Tensor;

/// Keys and values of every running sequence: per layer a `[slots, kv_heads,
/// capacity, head_dim]` tensor for keys and one for values. A sequence holds one slot
/// from admission to its end.
#[derive(Debug)]
pub struct KvPool {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    pub(crate) slots: usize,
    pub(crate) capacity: usize,
    pub(crate) free: Vec<usize>,
}

impl KvPool {
    /// A slot for a new sequence, if one is free.
    pub fn acquire(&mut self) -> Option<SeqCache> {
        self.free.pop().map(|slot| SeqCache { slot, len: 0 })
    }

    /// Gives a finished sequence's slot back.
    pub fn release(&mut self, cache: SeqCache) {
        debug_assert!(!self.free.contains(&cache.slot));
        self.free.push(cache.slot);
    }

    /// Slots: sequences that can run at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Tokens one slot holds: the longest sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.slots - self.free.len()
    }
}

/// One sequence's place in the pool: its slot and how many tokens it holds.
#[derive(Debug)]
pub struct SeqCache {
    pub(crate) slot: usize,
    pub(crate) len: usize,
}

impl SeqCache {
    /// Tokens already in the cache (the position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a batch: the tokens to add, and its cache.
pub struct Chunk<'a> {
    /// Tokens following what the cache holds.
    pub tokens: &'a [u32],
    /// The sequence's cache, extended by the call.
    pub cache: &'a mut SeqCache,
}
