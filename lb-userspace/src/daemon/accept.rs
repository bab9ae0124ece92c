//! What both listeners (control socket, metrics endpoint) share: the
//! connection budget, counters, and a back-off on failed accepts.
//!
//! A failing `accept` (EMFILE, ENFILE, ENOBUFS, ENOMEM) leaves the listener
//! readable, so an accept loop that simply retries spins at full speed and
//! logs a line per attempt: measured, 450 MB of log in 15 s. [`Backoff`]
//! sleeps 10 ms doubling to 1 s after each failure and logs at most one line
//! a second with the number of failures it did not log.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// First pause after a failed accept.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between accept attempts while they keep failing.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one accept-error log line per this period.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// What a listener has done so far; read by tests and available for metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted and served.
    pub served: AtomicU64,
    /// Connections accepted over the cap and closed at once.
    pub refused: AtomicU64,
    /// `accept` calls that failed.
    pub accept_errors: AtomicU64,
    /// Log lines written about failed accepts.
    pub error_logs: AtomicU64,
}

impl ServerStats {
    /// A snapshot of one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connections each listener may hold open for an open-file limit of
/// `nofile` (the soft `RLIMIT_NOFILE`): `(control socket, metrics endpoint)`.
///
/// The control socket gets a quarter of the budget (at most 4096, at least
/// 16), the metrics endpoint a sixteenth (at most 256, at least 8); the rest
/// is left to health checks, map and pin descriptors. With systemd's default
/// soft limit of 1024 that is 256 and 64; with the limit raised to the usual
/// hard limit (524288) it is 4096 and 256.
pub fn connection_budget(nofile: u64) -> (usize, usize) {
    let share = |div: u64, lo: u64, hi: u64| -> usize {
        usize::try_from((nofile / div).clamp(lo, hi)).unwrap_or(usize::MAX)
    };
    (share(4, 16, 4096), share(16, 8, 256))
}

fn nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        Ok(lim)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The soft `RLIMIT_NOFILE` of this process (1024 if it cannot be read).
pub fn open_file_limit() -> u64 {
    nofile().map_or(1024, |l| l.rlim_cur)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (systemd's default soft
/// limit of 1024 is far below what the listeners and checks may need) and
/// returns the soft limit now in force.
pub fn raise_open_file_limit() -> io::Result<u64> {
    let mut lim = nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit through a valid pointer; raising
        // the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Pauses and rate-limited logging for one accept loop.
pub(crate) struct Backoff {
    /// Names the listener in log lines.
    what: &'static str,
    pause: Option<Duration>,
    last_log: Option<Instant>,
    /// Failures since the last log line.
    suppressed: u64,
    /// Failures since the last successful accept.
    failing: u64,
}

impl Backoff {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            pause: None,
            last_log: None,
            suppressed: 0,
            failing: 0,
        }
    }

    /// An accept succeeded: the next failure starts again at the first pause.
    pub(crate) fn succeeded(&mut self) {
        if self.failing > 0 {
            tracing::info!(
                "accepting {} connections again after {} failed attempts",
                self.what,
                self.failing
            );
        }
        self.pause = None;
        self.failing = 0;
    }

    /// An accept failed: logs (at most once a second) and sleeps.
    pub(crate) async fn failed(&mut self, e: &io::Error, stats: &ServerStats) {
        ServerStats::bump(&stats.accept_errors);
        self.failing += 1;
        let pause = self.pause.map_or(FIRST_PAUSE, |p| (p * 2).min(MAX_PAUSE));
        self.pause = Some(pause);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            ServerStats::bump(&stats.error_logs);
            let hint = if is_out_of_resources(e) {
                " (out of descriptors or memory; connections wait in the backlog)"
            } else {
                ""
            };
            tracing::warn!(
                "accepting a {} connection: {e}{hint}; retrying in {} ms ({} similar errors not logged)",
                self.what,
                pause.as_millis(),
                self.suppressed
            );
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        tokio::time::sleep(pause).await;
    }
}

fn is_out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn budget_follows_the_open_file_limit() {
        assert_eq!(connection_budget(1024), (256, 64));
        assert_eq!(connection_budget(524_288), (4096, 256));
        assert_eq!(connection_budget(0), (16, 8));
        assert_eq!(connection_budget(u64::MAX), (4096, 256));
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_double_to_a_second_and_logs_once_a_second() {
        let stats = ServerStats::default();
        let mut b = Backoff::new("test");
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        let start = tokio::time::Instant::now();
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let t = tokio::time::Instant::now();
            b.failed(&e, &stats).await;
            pauses.push(t.elapsed().as_millis());
        }
        assert_eq!(
            pauses,
            [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000],
            "pauses"
        );
        assert!(start.elapsed() >= Duration::from_secs(4));
        assert_eq!(ServerStats::get(&stats.accept_errors), 10);
        b.succeeded();
        let t = tokio::time::Instant::now();
        b.failed(&e, &stats).await;
        assert_eq!(t.elapsed().as_millis(), 10, "a success resets the pause");
    }

    #[test]
    fn logs_at_most_once_a_second() {
        // Real time here: the log limit uses the wall clock, and the pauses
        // are short at first. 8 failures take 10+20+...+640 ms = 1.27 s.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let stats = ServerStats::default();
        let mut b = Backoff::new("test");
        let e = io::Error::from_raw_os_error(libc::ENFILE);
        rt.block_on(async {
            for _ in 0..8 {
                b.failed(&e, &stats).await;
            }
        });
        assert_eq!(ServerStats::get(&stats.accept_errors), 8);
        assert_eq!(
            ServerStats::get(&stats.error_logs),
            2,
            "logged at 0 s and 1.27 s"
        );
    }

    /// Set in the child process that runs out of descriptors.
    const EMFILE_CHILD: &str = "XLB_TEST_EMFILE_CHILD";

    /// Both accept loops, in a child process (descriptors are per process, so
    /// no other test is disturbed) whose open-file limit is used up.
    #[test]
    fn accept_loops_back_off_when_out_of_descriptors() {
        if std::env::var_os(EMFILE_CHILD).is_some() {
            return out_of_descriptors();
        }
        let exe = std::env::current_exe().expect("test binary");
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "daemon::accept::tests::accept_loops_back_off_when_out_of_descriptors",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(EMFILE_CHILD, "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting the child test");
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("waiting").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child test still running after 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("child output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(
            text.contains("backoff-ok"),
            "child did not run the test:\n{text}"
        );
    }

    fn out_of_descriptors() {
        use crate::api::{Request, Response};
        use crate::daemon::control::{ControlLimits, serve_control};
        use crate::daemon::http::{HttpLimits, serve_metrics};
        use std::io::{Read as _, Write as _};

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("xlb-emfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("xlb.sock");
        let (unix, tcp) = rt.block_on(async {
            let unix = tokio::net::UnixListener::bind(&path).expect("bind unix");
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind tcp");
            (unix, tcp)
        });
        let addr = tcp.local_addr().expect("address");
        // Clients whose connections wait in the backlogs while the daemon
        // cannot accept them.
        let mut ctl = std::os::unix::net::UnixStream::connect(&path).expect("connect unix");
        ctl.write_all(b"{\"op\":\"status\"}\n").expect("send");
        let mut scrape = std::net::TcpStream::connect(addr).expect("connect tcp");
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        ctl.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        scrape
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");

        // Use up the open-file limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid pointers; lowering the soft limit only affects this child.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            lim.rlim_cur = 256;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
        let mut filler = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => filler.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
                    break;
                }
            }
            assert!(filler.len() < 300, "no EMFILE");
        }

        let control_limits = ControlLimits::default();
        let control = control_limits.stats.clone();
        let http_limits = HttpLimits::default();
        let metrics = http_limits.stats.clone();
        let handler = |req: Request| async move {
            match req {
                Request::Status => Response::Done("status".into()),
                _ => Response::error(crate::api::FailureKind::Invalid, "unexpected"),
            }
        };
        let render = || async { Ok("xlb_up 1\n".to_string()) };
        let second = Duration::from_secs(1);
        rt.block_on(async {
            tokio::spawn(serve_control(unix, handler, control_limits));
            tokio::spawn(serve_metrics(tcp, render, http_limits));
            tokio::time::sleep(second).await;
        });
        let counts = |s: &ServerStats| {
            (
                ServerStats::get(&s.accept_errors),
                ServerStats::get(&s.error_logs),
            )
        };
        let (c_err, c_log) = counts(&control);
        let (m_err, m_log) = counts(&metrics);
        println!(
            "control: {c_err} failed accepts, {c_log} log lines; metrics: {m_err} failed accepts, {m_log} log lines in 1 s"
        );
        // 10 ms doubling: attempts at 0, 10, 30, 70, 150, 310, 630 ms.
        for (what, err, log) in [("control", c_err, c_log), ("metrics", m_err, m_log)] {
            assert!(
                (3..=10).contains(&err),
                "{what}: {err} accept attempts in 1 s"
            );
            assert_eq!(log, 1, "{what}: log lines in 1 s");
        }

        // Descriptors back: the waiting clients are served at the next attempt.
        drop(filler);
        rt.block_on(async {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        });
        assert_eq!(ServerStats::get(&control.served), 1);
        assert_eq!(ServerStats::get(&metrics.served), 1);
        let ctl_answer = std::thread::spawn(move || {
            let mut out = String::new();
            ctl.read_to_string(&mut out).map(|_| out)
        });
        let scrape_answer = std::thread::spawn(move || {
            let mut out = String::new();
            scrape.read_to_string(&mut out).map(|_| out)
        });
        // Keep the servers running until both clients have their answer.
        rt.block_on(async {
            let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
            while !(ctl_answer.is_finished() && scrape_answer.is_finished())
                && tokio::time::Instant::now() < give_up
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let ctl_answer = ctl_answer.join().expect("thread").expect("control answer");
        let scrape_answer = scrape_answer
            .join()
            .expect("thread")
            .expect("scrape answer");
        assert_eq!(ctl_answer, "{\"kind\":\"done\",\"data\":\"status\"}\n");
        assert!(
            scrape_answer.starts_with("HTTP/1.1 200 OK"),
            "{scrape_answer}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        println!("backoff-ok");
    }
}
