//! Writing to stdout without panicking: `println!` panics when the reader
//! has gone (`xlb sessions list | head`). Here a closed stdout becomes the
//! [`StdoutClosed`] error, which `main` turns into a quiet exit. SIGPIPE
//! stays ignored (Rust's default), so an early close of the daemon's socket
//! is still reported as an error instead of killing the CLI silently.

use std::io::Write as _;

use anyhow::{Context as _, Result};
use serde::Serialize;

/// Stdout's reader went away: nothing is left to say, and no error to report.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Whether `e` (or what it wraps) is [`StdoutClosed`].
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// Writes `text` to stdout and flushes it.
pub fn write(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

/// Writes one line to stdout.
pub fn line(text: &str) -> Result<()> {
    write(&format!("{text}\n"))
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    line(&serde_json::to_string_pretty(value).context("encoding JSON")?)
}

/// Prints rows as a left-aligned table under `header`, in one write.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    write(&table(header, rows))
}

/// The text of [`print_table`].
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.push_str(padded.join("  ").trim_end());
        text.push('\n');
    };
    line(&header.iter().map(|h| (*h).to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), String::new()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq\n");
    }

    #[test]
    fn closed_stdout_is_recognised_through_context() {
        let e = anyhow::Error::new(StdoutClosed).context("printing the sessions");
        assert!(is_stdout_closed(&e));
        assert!(!is_stdout_closed(&anyhow::anyhow!("other")));
    }
}
