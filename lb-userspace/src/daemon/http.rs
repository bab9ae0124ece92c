//! The metrics endpoint's HTTP server: hyper's HTTP/1 with a connection cap
//! and timeouts, so idle or slow scrapers cannot exhaust descriptors.
//!
//! One request per connection (keep-alive off: the answer carries
//! `connection: close`), a complete request head within
//! [`HttpLimits::header_read_timeout`] (counted from accept), and the whole
//! connection within [`HttpLimits::connection_timeout`]. Over
//! [`HttpLimits::max_connections`] a connection is accepted and closed at
//! once, so a scrape arriving while the cap is held by idle connections
//! fails until they time out (at most the header timeout later).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::accept::{Backoff, ServerStats};

/// The Prometheus text exposition format's content type.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Caps and timeouts of the metrics endpoint.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections served at once; more are closed at once. Default 256; the
    /// daemon sizes it from `RLIMIT_NOFILE` with
    /// [`super::accept::connection_budget`].
    pub max_connections: usize,
    /// Time from accept to a complete request head (default 5 s).
    pub header_read_timeout: Duration,
    /// Time from accept to the end of the connection (default 30 s).
    pub connection_timeout: Duration,
    /// Counters, shared with whoever wants to read them.
    pub stats: Arc<ServerStats>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            stats: Arc::default(),
        }
    }
}

/// Serves `GET /metrics` with the text `render` returns until the task is
/// aborted: other paths get 404, other methods 405, a failed render 500.
pub async fn serve_metrics<R, F>(listener: TcpListener, render: R, limits: HttpLimits)
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<String>> + Send + 'static,
{
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false)
        // A scrape's head is a few hundred bytes; 8 KiB is hyper's minimum.
        .max_buf_size(8 * 1024)
        .max_headers(32);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = Backoff::new("metrics");
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
            drop(stream);
            continue;
        };
        ServerStats::bump(&limits.stats.served);
        let render = render.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| answer(req, render.clone())),
        );
        let whole = limits.connection_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(whole, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!("metrics connection: {e}"),
                Err(_) => {
                    tracing::debug!("metrics connection closed after {} ms", whole.as_millis())
                }
            }
            drop(slot);
        });
    }
}

async fn answer<B, R, F>(
    req: hyper::Request<B>,
    render: R,
) -> Result<hyper::Response<Full<Bytes>>, Infallible>
where
    R: Fn() -> F,
    F: Future<Output = anyhow::Result<String>>,
{
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics\n".into(),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    Ok(match render().await {
        Ok(text) => reply(StatusCode::OK, METRICS_TYPE, text),
        Err(e) => {
            tracing::warn!("rendering metrics: {e:#}");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e:#}\n"),
            )
        }
    })
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> hyper::Response<Full<Bytes>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    struct Server {
        addr: SocketAddr,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start(limits: HttpLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let render = || async { Ok("xlb_up 1\n# EOF\n".to_string()) };
        let task = tokio::spawn(serve_metrics(listener, render, limits));
        Server { addr, task }
    }

    /// Sends `request` and reads until the server closes; `None` if it
    /// closed without answering.
    async fn http(addr: SocketAddr, request: &str) -> Option<String> {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // Refused connections may be reset before or during the write.
        if s.write_all(request.as_bytes()).await.is_err() {
            return None;
        }
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("closed within 10 s");
        if read.is_err() || out.is_empty() {
            return None;
        }
        Some(String::from_utf8(out).expect("UTF-8"))
    }

    const SCRAPE: &str = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn routes_methods_and_content_type() {
        let server = start(HttpLimits::default()).await;
        let ok = http(server.addr, SCRAPE).await.expect("answer");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let head = ok.to_ascii_lowercase();
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{ok}"
        );
        assert!(head.contains("connection: close\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nxlb_up 1\n# EOF\n"), "{ok}");

        let nf = http(server.addr, "GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("answer");
        assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
        let na = http(
            server.addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .expect("answer");
        assert!(na.starts_with("HTTP/1.1 405 "), "{na}");
        assert!(
            na.to_ascii_lowercase().contains("allow: get, head\r\n"),
            "{na}"
        );
        let head = http(server.addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("answer");
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        // A query string does not change the path.
        let q = http(server.addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            .await
            .expect("answer");
        assert!(q.starts_with("HTTP/1.0 200 OK\r\n"), "{q}");
    }

    #[tokio::test]
    async fn render_failure_is_a_500() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let render = || async { Err(anyhow::anyhow!("maps gone")) };
        let task = tokio::spawn(serve_metrics(listener, render, HttpLimits::default()));
        let r = http(addr, SCRAPE).await.expect("answer");
        task.abort();
        assert!(r.starts_with("HTTP/1.1 500 "), "{r}");
        assert!(r.ends_with("maps gone\n"), "{r}");
    }

    /// Defined behaviour: while idle connections hold every slot, a scrape is
    /// closed unanswered; once they reach the header timeout it is served.
    #[tokio::test]
    async fn scrape_served_once_idle_connections_time_out() {
        let limits = HttpLimits {
            max_connections: 8,
            header_read_timeout: Duration::from_millis(500),
            ..HttpLimits::default()
        };
        let stats = limits.stats.clone();
        let server = start(limits).await;
        let t = Instant::now();
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(TcpStream::connect(server.addr).await.expect("connect"));
        }
        // A trickling client is idle too: half a head, then nothing.
        idle[0].write_all(b"GET /met").await.expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(http(server.addr, SCRAPE).await, None, "over the cap");
        assert_eq!(ServerStats::get(&stats.served), 8);
        assert_eq!(ServerStats::get(&stats.refused), 13);

        let served = loop {
            if let Some(r) = http(server.addr, SCRAPE).await {
                break r;
            }
            assert!(t.elapsed() < Duration::from_secs(3), "never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let after = t.elapsed();
        assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
        assert!(
            after >= Duration::from_millis(450) && after < Duration::from_millis(1500),
            "served {after:?} after the idle connections opened"
        );
        // Every idle connection was closed by the server.
        for (i, s) in idle.iter_mut().enumerate() {
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("idle connection {i} still open"));
            if let Ok(n) = n {
                // hyper may answer a timed-out head with 408 before closing.
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{i}: {text}");
            }
        }
    }

    #[tokio::test]
    async fn a_slow_reader_is_cut_at_the_connection_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        // 32 MiB: more than the socket buffers hold, so the write blocks.
        let render = || async { Ok("x".repeat(32 << 20)) };
        let limits = HttpLimits {
            max_connections: 1,
            connection_timeout: Duration::from_millis(400),
            ..HttpLimits::default()
        };
        let task = tokio::spawn(serve_metrics(listener, render, limits));
        let mut hog = TcpStream::connect(addr).await.expect("connect");
        hog.write_all(SCRAPE.as_bytes()).await.expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(http(addr, SCRAPE).await, None, "the hog holds the slot");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(SCRAPE.as_bytes()).await.expect("send");
        let mut head = [0u8; 15];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
            .await
            .expect("answered within 5 s")
            .expect("read");
        assert_eq!(&head, b"HTTP/1.1 200 OK");
        task.abort();
        drop(hog);
    }
}
