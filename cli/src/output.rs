//! What the CLI writes for people: lines on stdout that a closed pipe cannot turn
//! into a failure, whether colour and progress bars are wanted, and counted nouns.

use std::io::{IsTerminal, Write};

/// Writes `text` to stdout and flushes it. Informational: a closed stdout must not
/// stop a server, so write errors are ignored.
pub fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Whether stderr is a terminal, where progress bars and colours go; when it is
/// not (a file, a pipe, a CI log), output is plain text without escape codes.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// `n` and `noun`, the noun in the plural unless `n` is one: "1 chunk",
/// "2 chunks", "0 chunks". `noun` is a regular noun (plural adds `s`).
pub fn count<N: std::fmt::Display + PartialEq + From<u8>>(n: N, noun: &str) -> String {
    if n == N::from(1) {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(count(1u64, "chunk"), "1 chunk");
        assert_eq!(count(2usize, "chunk"), "2 chunks");
        assert_eq!(count(0u32, "file"), "0 files");
    }
}
