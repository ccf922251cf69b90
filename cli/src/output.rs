//! What the CLI writes for people: lines on stdout that a closed pipe cannot turn
//! into a failure, whether colour and progress bars are wanted, counted nouns,
//! aligned tables, `--json` output, times and byte counts.

use std::io::{IsTerminal, Write};

use serde::Serialize;

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

/// Prints `value` as indented JSON, for `--json`.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `rows` under `header`, `indent` spaces in, each column as wide as its
/// widest cell.
pub fn print_table(indent: usize, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print_row = |cells: &mut dyn Iterator<Item = &str>| {
        let line: Vec<String> = cells
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{:indent$}{}", "", line.join("  ").trim_end());
    };
    print_row(&mut header.iter().copied());
    for row in rows {
        print_row(&mut row.iter().map(String::as_str));
    }
}

/// `-` for an empty list, the items joined by `,` otherwise.
pub fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// A time as UTC text, `2026-11-18 11:06:40Z`, from milliseconds since the epoch.
pub fn ms_to_text(millis: u64) -> String {
    aigrid_api::Timestamp::from_millis(millis).utc_text()
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
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
