//! Workload output on disk: files that rotate by size (`stdout.log`, then
//! `stdout.log.1` .. `stdout.log.N`, oldest last) and the tails the agent ships in
//! heartbeats, read back across rotation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The path of rotated file number `n` (1 is the newest) of the log at `path`.
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// A log file that never grows past `max_bytes`: when the next bytes would not fit,
/// the current file becomes `.1`, `.1` becomes `.2` and so on, and the file past
/// `max_files` is deleted. Opening an existing file appends to it, so a restarted
/// workload continues its allocation's log.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    max_files: u32,
}

impl RotatingFile {
    /// Opens (creating) `path` for appending. `max_bytes` of 0 is taken as 1.
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_owned(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            max_files,
        })
    }

    /// Appends `buf`, rotating as often as needed so that no file exceeds the limit.
    pub fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.size >= self.max_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.max_bytes - self.size).unwrap_or(usize::MAX);
            let n = room.min(buf.len());
            self.file.write_all(&buf[..n])?;
            self.size += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.max_files == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        ignore_missing(fs::remove_file(rotated_path(&self.path, self.max_files)))?;
        for n in (1..self.max_files).rev() {
            ignore_missing(fs::rename(
                rotated_path(&self.path, n),
                rotated_path(&self.path, n + 1),
            ))?;
        }
        fs::rename(&self.path, rotated_path(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Identifies how far a log has grown: rotation replaces the current file (a new
/// inode), and writes change its length, so any new output changes the mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMark {
    inode: u64,
    len: u64,
}

/// The mark of the log at `path`; `None` when it does not exist yet.
pub fn mark(path: &Path) -> Option<FileMark> {
    let meta = fs::metadata(path).ok()?;
    Some(FileMark {
        inode: meta.ino(),
        len: meta.len(),
    })
}

/// The last `max` bytes written to the log at `path`, reading back through its
/// rotated files (up to `max_files` of them) when the current one is shorter.
/// Missing files count as empty.
pub fn tail(path: &Path, max_files: u32, max: usize) -> io::Result<Vec<u8>> {
    // Newest first; reversed at the end.
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let mut left = max;
    for n in 0..=max_files {
        if left == 0 {
            break;
        }
        let file_path = if n == 0 {
            path.to_owned()
        } else {
            rotated_path(path, n)
        };
        let piece = match tail_of_file(&file_path, left) {
            Ok(piece) => piece,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        left -= piece.len();
        pieces.push(piece);
    }
    Ok(pieces.into_iter().rev().flatten().collect())
}

fn tail_of_file(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max as u64);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    file.take(max as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// `bytes` as text: a tail may begin inside a multi-byte character, so leading
/// continuation bytes are dropped before the lossy conversion.
pub fn lossy_text(bytes: &[u8]) -> String {
    let skip = bytes
        .iter()
        .take(3)
        .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
        .count();
    String::from_utf8_lossy(&bytes[skip..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut log = RotatingFile::open(&path, 10, 2).unwrap();
        log.write_all(b"0123456789abcdefghijKLMNOPQRSTuvw").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"uvw");
        assert_eq!(fs::read(rotated_path(&path, 1)).unwrap(), b"KLMNOPQRST");
        assert_eq!(fs::read(rotated_path(&path, 2)).unwrap(), b"abcdefghij");
        assert!(!rotated_path(&path, 3).exists());
    }

    #[test]
    fn reopening_appends_and_counts_existing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        RotatingFile::open(&path, 8, 1)
            .unwrap()
            .write_all(b"12345")
            .unwrap();
        RotatingFile::open(&path, 8, 1)
            .unwrap()
            .write_all(b"6789")
            .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"9");
        assert_eq!(fs::read(rotated_path(&path, 1)).unwrap(), b"12345678");
    }

    #[test]
    fn zero_files_truncates_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        let mut log = RotatingFile::open(&path, 4, 0).unwrap();
        log.write_all(b"abcdef").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"ef");
        assert!(!rotated_path(&path, 1).exists());
    }

    #[test]
    fn tail_reads_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut log = RotatingFile::open(&path, 10, 3).unwrap();
        log.write_all(b"0123456789abcdefghijKLM").unwrap();
        assert_eq!(tail(&path, 3, 5).unwrap(), b"ijKLM");
        assert_eq!(tail(&path, 3, 100).unwrap(), b"0123456789abcdefghijKLM");
        // Only as many rotated files as configured are read.
        assert_eq!(tail(&path, 1, 100).unwrap(), b"abcdefghijKLM");
        assert!(tail(&dir.path().join("missing.log"), 3, 10)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn marks_change_with_growth_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        assert_eq!(mark(&path), None);
        let mut log = RotatingFile::open(&path, 4, 1).unwrap();
        let empty = mark(&path).unwrap();
        log.write_all(b"abcd").unwrap();
        let full = mark(&path).unwrap();
        assert_ne!(empty, full);
        assert_eq!(mark(&path), Some(full));
        log.write_all(b"efgh").unwrap();
        assert_ne!(mark(&path), Some(full), "rotation to a same-size file");
    }

    #[test]
    fn lossy_text_drops_a_cut_character() {
        let snow = "☃x".as_bytes();
        assert_eq!(lossy_text(&snow[1..]), "x");
        assert_eq!(lossy_text(b"plain"), "plain");
    }
}
