//! `xlb sessions list | head`: a reader that closes stdout early must not make
//! the CLI panic. Runs the built `xlb` against a fake daemon on a private
//! Unix socket, so it needs no root, no pins and no namespace.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use xlb::api::{Response, SessionInfo};

/// The xlb binary: `XLB_BIN` (set by `cargo xtask test`) or the one cargo built for this test.
fn xlb_bin() -> PathBuf {
    std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_xlb")))
}

/// A session list far larger than a pipe buffer (64 KiB) once printed.
fn many_sessions() -> Response {
    let list = (0..20_000u32)
        .map(|i| SessionInfo {
            service: "web".into(),
            client: std::net::IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
            prefix: 32,
            backend: format!("b{}", i % 3),
            backend_address: Some(std::net::IpAddr::from([10, 0, 0, 21 + (i % 3) as u8])),
            idle_ms: u64::from(i),
            protected: i % 4 == 0,
        })
        .collect();
    Response::Sessions(list)
}

/// Answers one control connection with `response`, like the daemon would.
fn fake_daemon(socket: &Path, response: Response) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).expect("binding the fake daemon's socket");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accepting the CLI");
        let mut request = String::new();
        BufReader::new(&stream)
            .read_line(&mut request)
            .expect("reading the request");
        assert!(request.contains("sessions_list"), "{request}");
        let mut line = serde_json::to_vec(&response).expect("encoding");
        line.push(b'\n');
        // The CLI reads the whole answer before printing, so this completes.
        (&stream).write_all(&line).expect("answering");
    })
}

/// Waits for `child`, killing it after `limit`.
fn wait(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for xlb") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("xlb did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn closed_early(json: bool) {
    let dir = std::env::temp_dir().join(format!(
        "xlb-broken-pipe-{}-{}",
        std::process::id(),
        u8::from(json)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let socket = dir.join("xlb.sock");
    let server = fake_daemon(&socket, many_sessions());

    let mut cmd = Command::new(xlb_bin());
    cmd.arg("--socket").arg(&socket);
    if json {
        cmd.arg("--json");
    }
    let mut child = cmd
        .args(["sessions", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting xlb");
    // Read a little, as `head -1` would, then close the read end.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).expect("the first bytes");
    drop(stdout);

    let status = wait(&mut child, Duration::from_secs(20));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("reading stderr");
    server.join().expect("fake daemon");
    let _ = std::fs::remove_dir_all(&dir);

    let head = String::from_utf8_lossy(&first);
    assert!(
        if json {
            head.starts_with('[')
        } else {
            head.starts_with("SERVICE")
        },
        "{head}"
    );
    assert!(!stderr.contains("panicked"), "xlb panicked: {stderr}");
    assert!(
        stderr.is_empty(),
        "a closed stdout is not an error: {stderr}"
    );
    assert!(status.success(), "xlb exited with {status}: {stderr}");
}

#[test]
fn table_to_a_closed_pipe_is_quiet() {
    closed_early(false);
}

#[test]
fn json_to_a_closed_pipe_is_quiet() {
    closed_early(true);
}

/// The quiet exit is for stdout only: a daemon that is not there is still an error.
#[test]
fn other_errors_still_fail() {
    let out = Command::new(xlb_bin())
        .args(["--socket", "/nonexistent/xlb-test.sock", "sessions", "list"])
        .output()
        .expect("running xlb");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no xlb daemon is running"), "{err}");
}
