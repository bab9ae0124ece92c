//! Running external commands with visible progress and errors that quote the command and its stderr.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;

use anyhow::{Context, Result, bail};

/// How many trailing stderr lines a failure quotes.
const TAIL_LINES: usize = 20;

/// Renders a command as one shell-like line, with the env vars we set in front.
pub fn describe(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '*', '\'']) {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    let line = parts.join(" ");
    match cmd.get_current_dir() {
        Some(dir) => format!("(cd {} && {line})", dir.display()),
        None => line,
    }
}

/// The last `TAIL_LINES` lines of `bytes`.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// Runs a command silently; on failure the error holds the command line and its stderr tail.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        let mut text = tail(&out.stderr);
        if text.trim().is_empty() {
            text = tail(&out.stdout);
        }
        bail!("`{}` failed ({}):\n{text}", describe(cmd), out.status);
    }
    Ok(out)
}

/// Runs a command for its answer only: `None` if it cannot start or fails.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with its output shown live; on failure the error repeats the command and stderr tail.
pub fn live(cmd: &mut Command) -> Result<()> {
    let status = live_status(cmd)?;
    if !status.1.success() {
        bail!(
            "`{}` failed ({}); last lines of its stderr:\n{}",
            describe(cmd),
            status.1,
            status.0
        );
    }
    Ok(())
}

/// Test counts summed from cargo's `test result:` lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests ignored.
    pub ignored: u64,
}

impl Counts {
    /// Adds the counts of one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs a test command live, like [`live_status`], and also counts its results.
pub fn live_tests(cmd: &mut Command) -> Result<(String, ExitStatus, Counts)> {
    let (tail, status, stdout) = live_inner(cmd, true)?;
    let mut counts = Counts::default();
    for line in stdout.lines() {
        counts.add_line(&strip_ansi(line));
    }
    Ok((tail, status, counts))
}

/// Like [`live`] but returns the exit status (and stderr tail) instead of failing on it.
pub fn live_status(cmd: &mut Command) -> Result<(String, ExitStatus)> {
    let (tail, status, _) = live_inner(cmd, false)?;
    Ok((tail, status))
}

fn live_inner(cmd: &mut Command, keep_stdout: bool) -> Result<(String, ExitStatus, String)> {
    println!("$ {}", describe(cmd));
    // Cargo colours only a terminal; the tee below is a pipe, so say what the terminal is.
    if std::io::stderr().is_terminal() && std::env::var_os("CARGO_TERM_COLOR").is_none() {
        cmd.env("CARGO_TERM_COLOR", "always");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(if keep_stdout {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    let stderr = child.stderr.take().context("child stderr was not piped")?;
    // Copies stdout through while keeping it, for the caller to read counts from.
    let stdout_tee = child.stdout.take().map(|stdout| {
        thread::spawn(move || {
            let mut kept = String::new();
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            let mut out = std::io::stdout();
            while let Ok(n) = reader.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let _ = out.write_all(&line);
                kept.push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
            kept
        })
    });
    // Copies stderr through while remembering its tail for the error message.
    let tee = thread::spawn(move || {
        let mut last = VecDeque::with_capacity(TAIL_LINES);
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        let mut out = std::io::stderr();
        while let Ok(n) = reader.read_until(b'\n', &mut line) {
            if n == 0 {
                break;
            }
            let _ = out.write_all(&line);
            if last.len() == TAIL_LINES {
                last.pop_front();
            }
            last.push_back(
                strip_ansi(&String::from_utf8_lossy(&line))
                    .trim_end()
                    .to_owned(),
            );
            line.clear();
        }
        Vec::from(last).join("\n")
    });
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))?;
    let tail = tee.join().unwrap_or_default();
    let stdout = stdout_tee
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    Ok((tail, status, stdout))
}

/// Removes terminal colour sequences (`ESC [ ... letter`) so a quoted tail reads cleanly.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip the CSI parameters up to and including the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_result_lines_are_summed() {
        let mut c = Counts::default();
        c.add_line("test result: ok. 20 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.17s");
        c.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        c.add_line("running 2 tests");
        assert_eq!(
            c,
            Counts {
                passed: 23,
                failed: 2,
                ignored: 1
            }
        );
    }

    #[test]
    fn colour_codes_are_stripped() {
        assert_eq!(strip_ansi("\x1b[1m\x1b[31merror\x1b[0m: x"), "error: x");
    }

    #[test]
    fn commands_render_with_env_dir_and_quotes() {
        let mut c = Command::new("cargo");
        c.args(["test", "--test", "*"])
            .env("XLB_BIN", "/x")
            .current_dir("/w");
        assert_eq!(describe(&c), "(cd /w && XLB_BIN=/x cargo test --test '*')");
    }
}
