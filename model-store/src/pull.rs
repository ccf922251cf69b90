//! Pull: a registered model written out as files, every stripe fetched in parallel
//! through the reader's [`Fetcher`] and every chunk checked before it is written.
//! Files appear whole or not at all.

use std::collections::HashMap;
#[cfg(not(unix))]
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aigrid_api::ChunkDigest;
use futures_util::StreamExt;

use crate::crypto::ModelKey;
use crate::error::{io, StoreError};
use crate::manifest::{Manifest, Registration};
use crate::opener::ChunkOpener;
use crate::reader::{FetchOptions, Fetcher};
use crate::store::Store;

/// What a pull wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Stripes fetched.
    pub stripes: usize,
}

impl Store {
    /// Writes the model under `dest`, after checking its signature: stripes are
    /// fetched in parallel, every chunk is checked against its hash (and opened with
    /// `key` if sealed) before it is written, and files appear whole or not at all.
    pub async fn pull(
        &self,
        registration: &Registration,
        dest: &Path,
        key: Option<&ModelKey>,
    ) -> Result<PullStats, StoreError> {
        let fetcher = Arc::new(self.fetcher(registration, FetchOptions::default())?);
        let manifest = fetcher.manifest().clone();
        let opener = ChunkOpener::new(&manifest, key)?;
        // Where each stored chunk goes: every (file, offset) using it.
        let mut uses: HashMap<&ChunkDigest, Vec<(usize, u64)>> = HashMap::new();
        let mut first_file: HashMap<usize, &str> = HashMap::new();
        let locate = manifest.chunk_locations();
        for (f, entry) in manifest.files.iter().enumerate() {
            let mut at = 0;
            for c in &entry.chunks {
                uses.entry(&c.blake3).or_default().push((f, at));
                first_file
                    .entry(locate[&c.blake3].0)
                    .or_insert(entry.path.as_str());
                at += c.len;
            }
        }
        // Files are written to temporaries beside their place and renamed once every
        // byte is in and synced; on any failure every temporary (and any file already
        // renamed into place) is removed, so a pull leaves the whole model or nothing.
        let mut outputs: Vec<(PathBuf, PathBuf, std::fs::File)> = Vec::new();
        let mut placed: Vec<PathBuf> = Vec::new();
        let result = pull_into(
            &fetcher,
            &opener,
            &manifest,
            dest,
            &uses,
            &first_file,
            &mut outputs,
            &mut placed,
        )
        .await;
        if result.is_err() {
            for (tmp, _, _) in &outputs {
                let _ = std::fs::remove_file(tmp);
            }
            for path in &placed {
                let _ = std::fs::remove_file(path);
            }
        }
        result
    }
}

/// The body of [`Store::pull`]: creates the temporaries (recorded in `outputs`),
/// fills them from the stripes, syncs them and renames them into place (recorded in
/// `placed`), so the caller can clean up after a failure at any step.
#[allow(clippy::too_many_arguments)]
async fn pull_into(
    fetcher: &Arc<Fetcher>,
    opener: &ChunkOpener,
    manifest: &Manifest,
    dest: &Path,
    uses: &HashMap<&ChunkDigest, Vec<(usize, u64)>>,
    first_file: &HashMap<usize, &str>,
    outputs: &mut Vec<(PathBuf, PathBuf, std::fs::File)>,
    placed: &mut Vec<PathBuf>,
) -> Result<PullStats, StoreError> {
    for entry in &manifest.files {
        let path = dest.join(&entry.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let tmp = partial_path(&path);
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        outputs.push((tmp.clone(), path, file));
        outputs
            .last()
            .expect("just pushed")
            .2
            .set_len(entry.size)
            .map_err(io(&tmp))?;
    }
    let mut needed: Vec<usize> = first_file.keys().copied().collect();
    needed.sort_unstable();
    let parallel = fetcher.stripes_in_parallel();
    let mut fetches = futures_util::stream::iter(needed.into_iter().map(|i| {
        let fetcher = fetcher.clone();
        let file = first_file[&i].to_owned();
        async move { fetcher.stripe(i, &file).await.map(|b| (i, b)) }
    }))
    .buffer_unordered(parallel);
    let mut stats = PullStats::default();
    while let Some(result) = fetches.next().await {
        let (i, bytes) = result?;
        stats.stripes += 1;
        let mut offset = 0usize;
        for c in &manifest.stripes[i].chunks {
            let stored = &bytes[offset..offset + c.len as usize];
            offset += c.len as usize;
            let Some(targets) = uses.get(&c.blake3) else {
                continue;
            };
            let plain = opener.open(&c.blake3, stored)?;
            for (f, at) in targets {
                let (tmp, _, file) = &outputs[*f];
                write_at(file, &plain, *at).map_err(io(tmp))?;
                stats.bytes += plain.len() as u64;
            }
        }
    }
    for (tmp, _, file) in outputs.iter() {
        file.sync_all().map_err(io(tmp))?;
    }
    for (tmp, path, _) in outputs.iter() {
        std::fs::rename(tmp, path).map_err(io(path))?;
        placed.push(path.clone());
    }
    outputs.clear();
    stats.files = placed.len();
    Ok(stats)
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(crate::manifest::PARTIAL_SUFFIX);
    path.with_file_name(name)
}

#[cfg(unix)]
fn write_at(file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(not(unix))]
fn write_at(file: &std::fs::File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(bytes)
}
