//! Running external programs (`ip`, `nsenter`, `ethtool`) with errors that say what failed.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How many trailing stderr lines an error message quotes.
const STDERR_TAIL_LINES: usize = 15;

/// Renders a command as a shell-like line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Returns the last `STDERR_TAIL_LINES` lines of a byte buffer as text.
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
    lines[start..].join("\n")
}

/// Runs a command to completion, failing with its command line and stderr tail on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = run_unchecked(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            tail(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a command to completion and returns its output whatever the exit status.
pub fn run_unchecked(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))
}

/// Runs a command that reads `input` on stdin, failing like [`run`].
pub fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    // Writing from another thread keeps a large input from deadlocking against a full stdout pipe.
    let mut stdin = child.stdin.take().context("child stdin was not piped")?;
    let owned = input.to_owned();
    let writer = thread::spawn(move || stdin.write_all(owned.as_bytes()));
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{}`", describe(cmd)))?;
    let written = writer.join();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}\ninput was:\n{}",
            describe(cmd),
            out.status,
            tail(&out.stderr),
            input.trim_end()
        );
    }
    match written {
        Ok(Ok(())) => Ok(out),
        Ok(Err(e)) => Err(e).with_context(|| format!("writing stdin of `{}`", describe(cmd))),
        Err(_) => bail!("stdin writer of `{}` panicked", describe(cmd)),
    }
}

/// Runs `ip ARGS...` in the host namespace.
pub fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    let out = run(Command::new("ip").args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `cond` every `interval` until it returns true or `timeout` passes.
pub fn wait_until<F>(what: &str, timeout: Duration, interval: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = cond();
        match last {
            Ok(true) => return Ok(()),
            Ok(false) if Instant::now() < deadline => {}
            Err(_) if Instant::now() < deadline => {}
            Ok(false) => bail!("timed out after {timeout:?} waiting for {what}"),
            Err(e) => {
                return Err(e.context(format!("timed out after {timeout:?} waiting for {what}")));
            }
        }
        thread::sleep(interval);
    }
}
