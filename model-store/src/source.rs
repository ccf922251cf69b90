//! A model directory as a push reads it: every regular file found (links followed,
//! names checked to fit a manifest), then each file read in order and cut into
//! hashed (and sealed) chunks on their way to the stripes.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use aigrid_api::ChunkDigest;
use tokio::sync::mpsc;

use crate::chunk;
use crate::crypto::ModelKey;
use crate::error::{io, StoreError};
use crate::manifest::{ChunkRef, FileEntry};

/// A chunk read and hashed, on its way to a stripe.
pub(crate) struct CutChunk {
    pub(crate) hash: ChunkDigest,
    pub(crate) bytes: Vec<u8>,
    pub(crate) plain_len: u64,
}

/// Reads every file in order and sends its chunks, hashed (and sealed), down `tx`,
/// telling `counted` each chunk's plaintext length as it is read; answers the
/// manifest's file entries.
pub(crate) fn cut_files(
    dir: &Path,
    paths: &[String],
    chunk_size: u64,
    seal: Option<&ModelKey>,
    counted: &dyn Fn(u64),
    tx: &mpsc::Sender<CutChunk>,
) -> Result<Vec<FileEntry>, StoreError> {
    let mut files = Vec::new();
    for rel in paths {
        let path = dir.join(rel);
        let mut file = std::fs::File::open(&path).map_err(io(&path))?;
        let size = file.metadata().map_err(io(&path))?.len();
        let bounds = if rel.ends_with(".safetensors") && size >= 8 {
            let mut prefix = [0u8; 8];
            file.read_exact(&mut prefix).map_err(io(&path))?;
            let len = chunk::safetensors_header_len(&prefix)
                .unwrap_or(0)
                .min(size);
            let mut header = vec![0u8; usize::try_from(len).unwrap_or(0)];
            file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
            file.read_exact(&mut header).map_err(io(&path))?;
            // A file that only looks like safetensors is cut by size alone.
            chunk::safetensors_boundaries(&header).unwrap_or_default()
        } else {
            Vec::new()
        };
        file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        let mut chunks = Vec::new();
        let mut read = 0;
        for range in chunk::cut(size, chunk_size, &bounds) {
            let want = range.end - range.start;
            let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
            (&mut file)
                .take(want)
                .read_to_end(&mut buf)
                .map_err(io(&path))?;
            if buf.len() as u64 != want {
                return Err(io(&path)(std::io::Error::other(
                    "the file changed during the push",
                )));
            }
            read += buf.len() as u64;
            let plain_len = buf.len() as u64;
            let stored = match seal {
                Some(key) => key.seal(&buf),
                None => buf,
            };
            let hash = ChunkDigest::of(&stored);
            chunks.push(ChunkRef {
                blake3: hash.clone(),
                len: plain_len,
            });
            counted(plain_len);
            let sent = tx.blocking_send(CutChunk {
                hash,
                bytes: stored,
                plain_len,
            });
            if sent.is_err() {
                // The writer gave up; its error is the one to report.
                return Ok(files);
            }
        }
        if read != size {
            return Err(io(&path)(std::io::Error::other(
                "the file changed during the push",
            )));
        }
        files.push(FileEntry {
            path: rel.clone(),
            size,
            chunks,
        });
    }
    Ok(files)
}

/// Every regular file under `dir`, as `/`-separated paths relative to `root`.
/// Symbolic links are followed (model caches link files to shared blobs); one that
/// leads nowhere is an error, not a file silently left out.
pub(crate) fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), StoreError> {
    walk_depth(root, dir, out, 0)
}

/// Directory levels followed at most, which also ends a loop of linked directories.
const MAX_DEPTH: usize = 64;

fn walk_depth(
    root: &Path,
    dir: &Path,
    out: &mut Vec<String>,
    depth: usize,
) -> Result<(), StoreError> {
    if depth > MAX_DEPTH {
        return Err(io(dir)(std::io::Error::other(format!(
            "more than {MAX_DEPTH} directory levels (a loop of links?)"
        ))));
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let mut kind = entry.file_type().map_err(io(&path))?;
        if kind.is_symlink() {
            kind = std::fs::metadata(&path).map_err(io(&path))?.file_type();
        }
        if kind.is_dir() {
            walk_depth(root, &path, out, depth + 1)?;
        } else if kind.is_file() {
            let rel = path.strip_prefix(root).expect("under root");
            let mut parts = Vec::new();
            for c in rel.components() {
                let part = c.as_os_str().to_str().ok_or_else(|| {
                    io(&path)(std::io::Error::other("the file name is not UTF-8"))
                })?;
                parts.push(part.to_owned());
            }
            let rel = parts.join("/");
            if !crate::manifest::is_safe_path(&rel)
                || rel
                    .split('/')
                    .any(|part| part.ends_with(crate::manifest::PARTIAL_SUFFIX))
            {
                return Err(io(&path)(std::io::Error::other(
                    "the file name cannot be stored in a manifest",
                )));
            }
            out.push(rel);
        }
    }
    Ok(())
}
