//! The control socket: one JSON request line in, one JSON answer line out,
//! then close (see [`crate::api`]).
//!
//! [`serve_control`] runs as its own task, never beside the signal handlers
//! in one `select!`, and its accept loop never waits for anything but the
//! next connection: over the cap a connection gets a `busy` error line with a
//! non-blocking write and is closed at once. Every read and write has a
//! timeout, so idle, slow or hostile clients hold a slot for a bounded time
//! and cannot delay other requests or signals.

use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::accept::{Backoff, ServerStats};
use crate::api::{FailureKind, MAX_REQUEST_BYTES, Request, Response, decode_request};

/// Caps and timeouts of the control socket.
#[derive(Debug, Clone)]
pub struct ControlLimits {
    /// Connections served at once; more are answered `busy` and closed.
    /// Default 4096; the daemon sizes it from `RLIMIT_NOFILE` with
    /// [`super::accept::connection_budget`].
    pub max_connections: usize,
    /// Time from accept to a complete request line (default 5 s).
    pub read_timeout: Duration,
    /// Time to hand the answer to a client (default 5 s).
    pub write_timeout: Duration,
    /// Longest request line, newline excluded.
    pub max_request_bytes: usize,
    /// Counters, shared with whoever wants to read them.
    pub stats: Arc<ServerStats>,
}

impl Default for ControlLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            max_request_bytes: MAX_REQUEST_BYTES,
            stats: Arc::default(),
        }
    }
}

/// Binds the control socket with mode 0600, replacing a stale socket file
/// but refusing to steal one a live daemon answers on.
pub fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating socket directory {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", dir.display()))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt as _;
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "another xlb daemon is serving {} (stop it first, or use --socket)",
                    path.display()
                );
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Serves control requests on `listener` with `handler` until the task is
/// aborted. Connections in progress end by their own timeouts.
pub async fn serve_control<H, F>(listener: UnixListener, handler: H, limits: ControlLimits)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let limits = Arc::new(limits);
    let mut backoff = Backoff::new("control socket");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(e) => {
                backoff.failed(&e, &limits.stats).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            ServerStats::bump(&limits.stats.refused);
            refuse(stream, limits.max_connections);
            continue;
        };
        ServerStats::bump(&limits.stats.served);
        let handler = handler.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler, &limits).await {
                tracing::debug!("control connection: {e:#}");
            }
            drop(slot);
        });
    }
}

/// Answers a connection over the cap without waiting: a fresh socket's send
/// buffer is empty, so one non-blocking write of a short line goes through.
fn refuse(stream: UnixStream, max: usize) {
    let mut line = encode(&Response::error(
        FailureKind::Busy,
        format!("busy: {max} control connections are open (the daemon's cap); try again"),
    ));
    line.push(b'\n');
    match stream.into_std() {
        Ok(mut s) => {
            if let Err(e) = s.write(&line) {
                tracing::debug!("telling a control client it is over the cap: {e}");
            }
        }
        Err(e) => tracing::debug!("closing a control connection over the cap: {e}"),
    }
}

fn encode(response: &Response) -> Vec<u8> {
    serde_json::to_vec(response).unwrap_or_else(|e| {
        // Cannot happen for these types; still answer with something parseable.
        tracing::error!("encoding a control answer: {e}");
        br#"{"kind":"error","data":{"kind":"failed","message":"the daemon could not encode its answer"}}"#.to_vec()
    })
}

async fn connection<H, F>(stream: UnixStream, handler: H, limits: &ControlLimits) -> Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let (read, mut write) = stream.into_split();
    let max = limits.max_request_bytes;
    // One byte more than allowed, so an over-long line is seen as such.
    let mut reader = BufReader::new(read).take(max as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(limits.read_timeout, reader.read_until(b'\n', &mut line)).await;
    let response = match read {
        Err(_) => Response::error(
            FailureKind::Invalid,
            format!(
                "no complete request line within {} ms",
                limits.read_timeout.as_millis()
            ),
        ),
        Ok(Err(e)) => return Err(e).context("reading the request"),
        Ok(Ok(_)) if line.strip_suffix(b"\n").unwrap_or(&line).len() > max => Response::error(
            FailureKind::Invalid,
            format!("request line longer than {max} bytes"),
        ),
        Ok(Ok(_)) => match decode_request(&line) {
            Ok(request) => handler(request).await,
            Err(problem) => {
                Response::error(FailureKind::Invalid, format!("bad request: {problem}"))
            }
        },
    };
    if let Response::Error(failure) = &response {
        tracing::debug!(
            kind = failure.kind.name(),
            "control request refused: {failure}"
        );
    }
    let mut out = encode(&response);
    out.push(b'\n');
    tokio::time::timeout(limits.write_timeout, async {
        write.write_all(&out).await?;
        write.shutdown().await
    })
    .await
    .with_context(|| {
        format!(
            "the client did not take the answer within {} ms",
            limits.write_timeout.as_millis()
        )
    })?
    .context("sending the answer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StatusInfo;
    use std::time::Instant;
    use tokio::net::UnixStream;

    fn status() -> StatusInfo {
        StatusInfo {
            pid: 1,
            uptime_s: 2,
            config: "c".into(),
            state_file: "s".into(),
            interface: "i".into(),
            pins: "p".into(),
            adopted: false,
            services: 3,
            backends: 4,
            backends_up: 4,
            panic_services: Vec::new(),
            sessions: 0,
            protected_sessions: 0,
            sessions_counted_ms_ago: None,
            in_sync: true,
            last_write_error: None,
            reconcile_repairs: 0,
            fingerprint: String::new(),
        }
    }

    /// Answers `status` at once, `service_list` with 16 MiB (more than a
    /// socket buffer holds), anything else with `done`.
    async fn fake(req: Request) -> Response {
        match req {
            Request::Status => Response::Status(status()),
            Request::ServiceList => Response::Done("x".repeat(16 << 20)),
            _ => Response::Done("ok".into()),
        }
    }

    struct Server {
        _dir: TempDir,
        path: std::path::PathBuf,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A private directory removed on drop.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn start(limits: ControlLimits) -> Server {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xlb-control-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("xlb.sock");
        let listener = bind_socket(&path).expect("bind");
        let task = tokio::spawn(serve_control(listener, fake, limits));
        Server {
            _dir: TempDir(dir),
            path,
            task,
        }
    }

    /// Sends `line` and reads the whole answer (until the daemon closes).
    async fn ask(path: &Path, line: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.expect("connect");
        s.write_all(line).await.expect("send");
        read_all(&mut s).await
    }

    /// Everything the daemon sent before closing. A daemon that closes with
    /// part of the request unread makes the kernel report a reset after the
    /// data; the data is what counts.
    async fn read_all(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("answer within 10 s");
        if let Err(e) = read {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        String::from_utf8(out).expect("UTF-8 answer")
    }

    fn decode(answer: &str) -> Response {
        assert!(answer.ends_with('\n'), "one line: {answer:?}");
        serde_json::from_str(answer.trim_end()).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    fn error(answer: &str) -> String {
        match decode(answer) {
            Response::Error(e) => e.message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_answered_beside_1000_idle_connections() {
        // 1000 idle connections need 2000 descriptors in this process;
        // raising the soft limit harms no other test.
        let nofile = crate::daemon::accept::raise_open_file_limit().expect("RLIMIT_NOFILE");
        assert!(
            nofile > 2100,
            "open-file limit {nofile} too low for this test"
        );
        let server = start(ControlLimits::default());
        let mut idle = Vec::new();
        for i in 0..1000 {
            idle.push(
                UnixStream::connect(&server.path)
                    .await
                    .unwrap_or_else(|e| panic!("idle connection {i}: {e}")),
            );
        }
        // Let the daemon accept them all before asking.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        let answer = ask(&server.path, b"{\"op\":\"status\"}\n").await;
        let took = t.elapsed();
        assert_eq!(
            serde_json::to_value(decode(&answer)).expect("json")["data"]["services"],
            3
        );
        assert!(took < Duration::from_millis(200), "status took {took:?}");
        drop(idle);
    }

    #[tokio::test]
    async fn over_the_cap_gets_the_busy_line() {
        let limits = ControlLimits {
            max_connections: 4,
            ..ControlLimits::default()
        };
        let stats = limits.stats.clone();
        let server = start(limits);
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(UnixStream::connect(&server.path).await.expect("connect"));
        }
        let t = Instant::now();
        let e = error(&ask(&server.path, b"{\"op\":\"status\"}\n").await);
        assert!(e.starts_with("busy: 4 control connections"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1), "answered at once");
        assert_eq!(ServerStats::get(&stats.refused), 1);
        assert_eq!(ServerStats::get(&stats.served), 4);
        // A slot freed is a slot served.
        drop(idle.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = ask(&server.path, b"{\"op\":\"status\"}\n").await;
            if matches!(decode(&answer), Response::Status(_)) {
                break;
            }
            assert!(Instant::now() < deadline, "slot never freed: {answer}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn idle_connection_closed_after_the_read_timeout() {
        let server = start(ControlLimits {
            read_timeout: Duration::from_millis(300),
            ..ControlLimits::default()
        });
        let t = Instant::now();
        let mut s = UnixStream::connect(&server.path).await.expect("connect");
        // Half a request, then silence: still idle as far as the daemon cares.
        s.write_all(b"{\"op\":").await.expect("send");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("closed within 5 s")
            .expect("read");
        let took = t.elapsed();
        assert_eq!(error(&out), "no complete request line within 300 ms");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_loses_its_slot() {
        let server = start(ControlLimits {
            max_connections: 1,
            write_timeout: Duration::from_millis(300),
            ..ControlLimits::default()
        });
        // Asks for 16 MiB and never reads it.
        let mut hog = UnixStream::connect(&server.path).await.expect("connect");
        hog.write_all(b"{\"op\":\"service_list\"}\n")
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = error(&ask(&server.path, b"{\"op\":\"status\"}\n").await);
        assert!(e.starts_with("busy"), "the hog holds the only slot: {e}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let answer = ask(&server.path, b"{\"op\":\"status\"}\n").await;
        assert!(
            matches!(decode(&answer), Response::Status(_)),
            "slot freed after the write timeout: {answer}"
        );
        drop(hog);
    }

    #[tokio::test]
    async fn bad_requests_get_one_error_line() {
        let server = start(ControlLimits {
            max_request_bytes: 1024,
            ..ControlLimits::default()
        });
        let e = error(&ask(&server.path, b"{\"op\":\"sta\xfftus\"}\n").await);
        assert!(e.starts_with("bad request: request is not UTF-8"), "{e}");
        let e = error(&ask(&server.path, b"{\"op\":\"status\",\"bogus\":1}\n").await);
        assert_eq!(
            e,
            r#"bad request: unknown field "bogus" for op "status": it takes no fields"#
        );
        let e = error(&ask(&server.path, b"{\"op\":\"status\"\n").await);
        assert!(
            e.starts_with("bad request: request is not valid JSON"),
            "{e}"
        );
        let long = vec![b' '; 2000];
        let e = error(&ask(&server.path, &long).await);
        assert_eq!(e, "request line longer than 1024 bytes");
        // Without a trailing newline, end of stream ends the request.
        let mut s = UnixStream::connect(&server.path).await.expect("connect");
        s.write_all(b"{\"op\":\"reload\"}").await.expect("send");
        s.shutdown().await.expect("half close");
        let out = read_all(&mut s).await;
        assert!(
            matches!(decode(&out), Response::Done(m) if m == "ok"),
            "{out}"
        );
    }
}
