//! Where files are cut into chunks. Chunks are at most `chunk_size` bytes and never
//! cross a boundary the caller asks for; in a safetensors file the boundaries are the
//! tensor starts, so every tensor maps to a contiguous run of whole chunks and a reader
//! fetches exactly the chunks of the tensors it wants.

use std::ops::Range;

/// Chunk size when a push does not choose one: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Largest safetensors header accepted, as the format's reference reader caps it.
pub const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// Why a safetensors header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The file is too short to hold its header.
    #[error("safetensors header truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the header needs.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// The header is not the format's JSON.
    #[error("safetensors header invalid: {0}")]
    Invalid(String),
}

/// The byte ranges of the chunks of a file of `size` bytes: at most `chunk_size`
/// each, cut at every offset in `boundaries` (sorted or not; ones outside the file are
/// ignored). An empty file has no chunks.
pub fn cut(size: u64, chunk_size: u64, boundaries: &[u64]) -> Vec<Range<u64>> {
    let chunk_size = chunk_size.max(1);
    let mut cuts: Vec<u64> = boundaries
        .iter()
        .copied()
        .filter(|b| *b > 0 && *b < size)
        .collect();
    cuts.push(size);
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for end in cuts {
        while start < end {
            let stop = (start + chunk_size).min(end);
            out.push(start..stop);
            start = stop;
        }
    }
    out
}

/// How many bytes a safetensors file's header takes (its 8-byte length prefix
/// included), from the first 8 bytes.
pub fn safetensors_header_len(prefix: &[u8]) -> Result<u64, ChunkError> {
    let bytes: [u8; 8] =
        prefix
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or(ChunkError::Truncated {
                need: 8,
                have: prefix.len() as u64,
            })?;
    let n = u64::from_le_bytes(bytes);
    if n > MAX_SAFETENSORS_HEADER {
        return Err(ChunkError::Invalid(format!(
            "header of {n} bytes is too large"
        )));
    }
    Ok(8 + n)
}

/// A safetensors header's JSON (after its 8-byte length), parsed and checked by the
/// `safetensors` crate: every tensor's dtype and shape account for its bytes, and
/// the tensors lie back to back from the start of the data.
pub fn parse_safetensors_header(json: &[u8]) -> Result<safetensors::tensor::Metadata, String> {
    serde_json::from_slice(json).map_err(|e| format!("safetensors header: {e}"))
}

/// The file offsets where a safetensors file's tensors start (and where its data
/// begins), read from its header: the first [`safetensors_header_len`] bytes.
pub fn safetensors_boundaries(header: &[u8]) -> Result<Vec<u64>, ChunkError> {
    let len = safetensors_header_len(header)?;
    let json = header
        .get(8..usize::try_from(len).unwrap_or(usize::MAX))
        .ok_or(ChunkError::Truncated {
            need: len,
            have: header.len() as u64,
        })?;
    let metadata = parse_safetensors_header(json).map_err(ChunkError::Invalid)?;
    let mut out = vec![len];
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        for offset in [start, end] {
            out.push(len.checked_add(offset as u64).ok_or_else(|| {
                ChunkError::Invalid(format!("tensor `{name}` lies past any file's end"))
            })?);
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(size: u64, chunks: &[Range<u64>]) -> bool {
        let mut at = 0;
        for c in chunks {
            if c.start != at || c.end <= c.start {
                return false;
            }
            at = c.end;
        }
        at == size
    }

    #[test]
    fn chunks_cover_the_file_and_respect_sizes_and_boundaries() {
        let c = 10;
        for size in [0u64, 1, c - 1, c, c + 1, 37] {
            let chunks = cut(size, c, &[]);
            assert!(covers(size, &chunks), "{size}: {chunks:?}");
            assert!(chunks.iter().all(|r| r.end - r.start <= c));
            assert_eq!(chunks.len() as u64, size.div_ceil(c));
        }
        let chunks = cut(37, 10, &[3, 25, 3, 99]);
        assert_eq!(chunks, vec![0..3, 3..13, 13..23, 23..25, 25..35, 35..37]);
    }

    #[test]
    fn safetensors_tensors_start_on_chunk_boundaries() {
        let json = br#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json);
        let header = safetensors_header_len(&file).unwrap();
        assert_eq!(header, 8 + json.len() as u64);
        let bounds = safetensors_boundaries(&file).unwrap();
        assert_eq!(bounds, vec![header, header + 8, header + 16]);
        let chunks = cut(header + 16, 4, &bounds);
        assert!(chunks.iter().any(|c| c.start == header + 8));
        assert!(covers(header + 16, &chunks));

        assert!(matches!(
            safetensors_boundaries(&file[..10]),
            Err(ChunkError::Truncated { .. })
        ));
        let mut bad = 5u64.to_le_bytes().to_vec();
        bad.extend_from_slice(b"nope!");
        assert!(matches!(
            safetensors_boundaries(&bad),
            Err(ChunkError::Invalid(_))
        ));
        assert!(safetensors_header_len(&u64::MAX.to_le_bytes()).is_err());

        // Offsets that wrap past u64::MAX once the header is added.
        let json = format!(r#"{{"a":{{"data_offsets":[0,{}]}}}}"#, u64::MAX);
        let mut huge = (json.len() as u64).to_le_bytes().to_vec();
        huge.extend_from_slice(json.as_bytes());
        assert!(matches!(
            safetensors_boundaries(&huge),
            Err(ChunkError::Invalid(_))
        ));
    }
}
