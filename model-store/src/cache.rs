//! A bounded on-disk cache of verified chunks, named by their digest. Writes are
//! atomic (temporary file, then rename), the least recently used unpinned chunks are
//! evicted past the byte budget, and the cache survives restarts: recency is kept in
//! file modification times and pins in a small file. A reader re-verifies every chunk
//! it takes from the cache, so a damaged file is refetched, never served.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use aigrid_api::ChunkDigest;

/// How full the cache is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Chunks held.
    pub chunks: usize,
    /// Bytes held.
    pub bytes: u64,
    /// Bytes held by pinned chunks.
    pub pinned_bytes: u64,
    /// The budget.
    pub max_bytes: u64,
}

struct Entry {
    size: u64,
    used: u64,
}

struct State {
    entries: HashMap<ChunkDigest, Entry>,
    pinned: HashSet<ChunkDigest>,
    bytes: u64,
    clock: u64,
}

/// The cache.
pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkCache({})", self.dir.display())
    }
}

/// The directory, inside a cache's, its chunks are kept in.
pub const CHUNKS_DIR: &str = "chunks";

impl ChunkCache {
    /// Opens (or creates) the cache in `dir` with a budget of `max_bytes`, taking in
    /// what an earlier run left and dropping unfinished writes.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<ChunkCache> {
        let chunks = dir.join(CHUNKS_DIR);
        std::fs::create_dir_all(&chunks)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&chunks)? {
            let entry = entry?;
            let name = ChunkDigest::try_from(entry.file_name().to_string_lossy().into_owned());
            let meta = entry.metadata()?;
            let Some(name) = name.ok().filter(|_| meta.is_file()) else {
                // An interrupted write or a stranger: not ours to keep.
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            let at = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((at, name, meta.len()));
        }
        found.sort();
        let mut state = State {
            entries: HashMap::new(),
            pinned: HashSet::new(),
            bytes: 0,
            clock: 0,
        };
        for (_, name, size) in found {
            state.clock += 1;
            state.bytes += size;
            state.entries.insert(
                name,
                Entry {
                    size,
                    used: state.clock,
                },
            );
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("pinned")) {
            state.pinned = text
                .lines()
                .filter_map(|l| ChunkDigest::try_from(l.to_owned()).ok())
                .collect();
        }
        let cache = ChunkCache {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
        };
        cache.evict(&mut cache.state.lock().expect("cache lock"));
        Ok(cache)
    }

    fn path(&self, hash: &ChunkDigest) -> PathBuf {
        self.dir.join(CHUNKS_DIR).join(hash.as_str())
    }

    /// The chunk's bytes if cached (unverified: the caller checks them).
    pub fn get(&self, hash: &ChunkDigest) -> Option<Vec<u8>> {
        {
            let mut state = self.state.lock().expect("cache lock");
            state.clock += 1;
            let now = state.clock;
            state.entries.get_mut(hash)?.used = now;
        }
        match std::fs::read(self.path(hash)) {
            Ok(bytes) => {
                // Keep recency across restarts; a failure only costs ordering.
                if let Ok(file) = std::fs::File::options().append(true).open(self.path(hash)) {
                    let _ = file.set_modified(SystemTime::now());
                }
                Some(bytes)
            }
            Err(_) => {
                self.remove(hash);
                None
            }
        }
    }

    /// Whether the chunk is cached.
    pub fn contains(&self, hash: &ChunkDigest) -> bool {
        self.state
            .lock()
            .expect("cache lock")
            .entries
            .contains_key(hash)
    }

    /// Drops a chunk (found damaged, say).
    pub fn remove(&self, hash: &ChunkDigest) {
        let mut state = self.state.lock().expect("cache lock");
        if let Some(entry) = state.entries.remove(hash) {
            state.bytes -= entry.size;
        }
        let _ = std::fs::remove_file(self.path(hash));
    }

    /// Stores a verified chunk, then evicts past the budget. A chunk larger than the
    /// whole budget is not kept, nor a pinned one that would take pinned chunks past
    /// it (eviction could never bring the cache back under).
    pub fn insert(&self, hash: &ChunkDigest, bytes: &[u8]) -> std::io::Result<()> {
        let size = bytes.len() as u64;
        if size > self.max_bytes {
            return Ok(());
        }
        {
            let state = self.state.lock().expect("cache lock");
            if state.entries.contains_key(hash) || !self.pin_fits(&state, hash, size) {
                return Ok(());
            }
        }
        let tmp = self
            .dir
            .join(CHUNKS_DIR)
            .join(format!(".{hash}.{}.tmp", rand::random::<u32>()));
        std::fs::write(&tmp, bytes)?;
        let mut state = self.state.lock().expect("cache lock");
        // Checked again: another insert may have pinned bytes in meanwhile.
        if !state.entries.contains_key(hash) && !self.pin_fits(&state, hash, size) {
            drop(state);
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        if let Err(e) = std::fs::rename(&tmp, self.path(hash)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        state.clock += 1;
        let used = state.clock;
        if let Some(old) = state.entries.insert(hash.clone(), Entry { size, used }) {
            state.bytes -= old.size;
        }
        state.bytes += size;
        self.evict(&mut state);
        Ok(())
    }

    fn evict(&self, state: &mut State) {
        if state.bytes <= self.max_bytes {
            return;
        }
        let mut order: Vec<(u64, ChunkDigest)> = state
            .entries
            .iter()
            .filter(|(h, _)| !state.pinned.contains(*h))
            .map(|(h, e)| (e.used, h.clone()))
            .collect();
        order.sort_unstable();
        for (_, hash) in order {
            if state.bytes <= self.max_bytes {
                break;
            }
            if let Some(entry) = state.entries.remove(&hash) {
                state.bytes -= entry.size;
                let _ = std::fs::remove_file(self.path(&hash));
            }
        }
    }

    /// Whether a chunk of `size` bytes may be cached: an unpinned one always (it can
    /// be evicted), a pinned one only if pinned chunks stay within the budget.
    fn pin_fits(&self, state: &State, hash: &ChunkDigest, size: u64) -> bool {
        !state.pinned.contains(hash) || pinned_bytes(state).saturating_add(size) <= self.max_bytes
    }

    /// Whether pinning `chunks` (digest and stored size) keeps the pinned chunks
    /// within the budget. Chunks already pinned and cached are not counted twice, so
    /// pinning a model again fits whenever it did the first time. Ask before
    /// [`ChunkCache::pin`]: pins themselves are not refused, but a pinned chunk that
    /// does not fit is never cached.
    pub fn pin_would_fit<'a>(
        &self,
        chunks: impl IntoIterator<Item = (&'a ChunkDigest, u64)>,
    ) -> bool {
        let state = self.state.lock().expect("cache lock");
        let mut counted = HashSet::new();
        let mut total = pinned_bytes(&state);
        for (hash, size) in chunks {
            let held = state.pinned.contains(hash) && state.entries.contains_key(hash);
            if !held && counted.insert(hash) {
                total = total.saturating_add(size);
            }
        }
        total <= self.max_bytes
    }

    /// Keeps these chunks from eviction (once cached), across restarts.
    pub fn pin(&self, hashes: impl IntoIterator<Item = ChunkDigest>) -> std::io::Result<()> {
        let mut state = self.state.lock().expect("cache lock");
        state.pinned.extend(hashes);
        self.save_pins(&state)
    }

    /// Lets these chunks be evicted again.
    pub fn unpin<'a>(
        &self,
        hashes: impl IntoIterator<Item = &'a ChunkDigest>,
    ) -> std::io::Result<()> {
        let mut state = self.state.lock().expect("cache lock");
        for h in hashes {
            state.pinned.remove(h);
        }
        self.evict(&mut state);
        self.save_pins(&state)
    }

    /// Drops every chunk `keep` refuses, pinned or not, with its pin: the chunks of
    /// models that were deleted, so their bytes leave the disk now rather than when
    /// the budget needs room. Answers how many chunks and bytes went.
    pub fn retain(&self, keep: impl Fn(&ChunkDigest) -> bool) -> std::io::Result<(usize, u64)> {
        let mut state = self.state.lock().expect("cache lock");
        let gone: Vec<ChunkDigest> = state.entries.keys().filter(|h| !keep(h)).cloned().collect();
        let mut bytes = 0;
        for hash in &gone {
            if let Some(entry) = state.entries.remove(hash) {
                state.bytes -= entry.size;
                bytes += entry.size;
            }
            let _ = std::fs::remove_file(self.path(hash));
        }
        let pins = state.pinned.len();
        state.pinned.retain(|h| keep(h));
        if state.pinned.len() != pins {
            self.save_pins(&state)?;
        }
        Ok((gone.len(), bytes))
    }

    fn save_pins(&self, state: &State) -> std::io::Result<()> {
        let mut list: Vec<&str> = state.pinned.iter().map(ChunkDigest::as_str).collect();
        list.sort_unstable();
        let tmp = self.dir.join(".pinned.tmp");
        std::fs::write(&tmp, list.join("\n"))?;
        std::fs::rename(tmp, self.dir.join("pinned"))
    }

    /// How full it is.
    pub fn stats(&self) -> CacheStats {
        let state = self.state.lock().expect("cache lock");
        CacheStats {
            chunks: state.entries.len(),
            bytes: state.bytes,
            pinned_bytes: pinned_bytes(&state),
            max_bytes: self.max_bytes,
        }
    }
}

/// Bytes held by cached chunks that are pinned.
fn pinned_bytes(state: &State) -> u64 {
    state
        .entries
        .iter()
        .filter(|(h, _)| state.pinned.contains(*h))
        .map(|(_, e)| e.size)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u8) -> ChunkDigest {
        ChunkDigest::of(&[i])
    }

    #[test]
    fn least_recently_used_unpinned_chunks_go_first_and_the_cache_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 300).unwrap();
        for i in 0..3 {
            cache.insert(&h(i), &[i; 100]).unwrap();
        }
        cache.pin([h(0)]).unwrap();
        assert!(cache.get(&h(1)).is_some());
        cache.insert(&h(3), &[3; 100]).unwrap();
        // 0 is pinned, 1 was just used: 2 goes.
        assert!(!cache.contains(&h(2)));
        assert!(cache.contains(&h(0)) && cache.contains(&h(1)) && cache.contains(&h(3)));
        assert_eq!(cache.stats().bytes, 300);
        assert_eq!(cache.stats().pinned_bytes, 100);
        // Too big for the whole budget: not kept.
        cache.insert(&h(4), &[4; 400]).unwrap();
        assert!(!cache.contains(&h(4)));
        // An interrupted write is dropped on open; entries and pins come back.
        std::fs::write(dir.path().join("chunks/.x.tmp"), b"junk").unwrap();
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 300).unwrap();
        assert_eq!(cache.stats().chunks, 3);
        assert_eq!(cache.get(&h(3)).unwrap(), vec![3; 100]);
        cache.insert(&h(5), &[5; 100]).unwrap();
        assert!(cache.contains(&h(0)), "pins survive a restart");
        cache.unpin([&h(0)]).unwrap();
        // A smaller budget on reopen evicts down to it.
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 100).unwrap();
        assert_eq!(cache.stats().chunks, 1);
        assert!(!dir.path().join("chunks/.x.tmp").exists());
    }

    #[test]
    fn chunks_of_deleted_models_leave_the_disk_pinned_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 1000).unwrap();
        for i in 0..4 {
            cache.insert(&h(i), &[i; 100]).unwrap();
        }
        cache.pin([h(1), h(2)]).unwrap();
        let live = [h(0), h(2)];
        assert_eq!(cache.retain(|c| live.contains(c)).unwrap(), (2, 200));
        assert!(cache.contains(&h(0)) && cache.contains(&h(2)));
        assert!(!cache.contains(&h(1)) && !cache.contains(&h(3)));
        assert!(!dir.path().join("chunks").join(h(1).as_str()).exists());
        assert_eq!(cache.stats().bytes, 200);
        assert_eq!(cache.stats().pinned_bytes, 100);
        // The dropped pin stays dropped across a restart.
        drop(cache);
        let cache = ChunkCache::open(dir.path(), 1000).unwrap();
        cache.insert(&h(1), &[1; 100]).unwrap();
        assert_eq!(cache.stats().pinned_bytes, 100, "only h(2) is still pinned");
    }

    #[test]
    fn pinned_chunks_stay_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 250).unwrap();
        let want: Vec<(ChunkDigest, u64)> = (0..3).map(|i| (h(i), 100)).collect();
        let asked = |n: usize| want[..n].iter().map(|(h, s)| (h, *s));
        assert!(cache.pin_would_fit(asked(2)));
        assert!(!cache.pin_would_fit(asked(3)), "300 pinned bytes in 250");
        // Pinned anyway: the third pinned chunk is not cached, and nothing pinned is
        // lost to make room.
        cache.pin(want.iter().map(|(h, _)| h.clone())).unwrap();
        for i in 0..3 {
            cache.insert(&h(i), &[i; 100]).unwrap();
        }
        assert!(cache.contains(&h(0)) && cache.contains(&h(1)));
        assert!(!cache.contains(&h(2)));
        assert_eq!(cache.stats().pinned_bytes, 200);
        assert!(cache.stats().bytes <= 250);
        // Pinning the same chunks again is not counted twice.
        assert!(cache.pin_would_fit(asked(2)));
        assert!(cache.pin_would_fit([(&h(0), 100), (&h(0), 100)]));
        assert!(!cache.pin_would_fit([(&h(9), 51)]));
        // Unpinned chunks still come and go within the budget.
        cache.insert(&h(5), &[5; 50]).unwrap();
        assert!(cache.contains(&h(5)));
        assert_eq!(cache.stats().bytes, 250);
    }
}
