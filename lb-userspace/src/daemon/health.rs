//! Health checks: how one check of one backend runs. The tasks that run
//! them are in `checks.rs`; the rise/fall state machine in `desired.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::{HealthConfig, HealthKind};

/// Largest HTTP answer head read by a check.
const MAX_HTTP_HEAD: usize = 4096;

/// Runs one check; `Ok(latency)` or `Err(why)` in words for the transition log.
pub async fn check(addr: SocketAddr, spec: &HealthConfig) -> Result<Duration, String> {
    let start = Instant::now();
    let timeout = spec.timeout;
    let result = tokio::time::timeout(timeout, run(addr, &spec.kind)).await;
    match result {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!(
            "timeout after {}",
            humantime::format_duration(timeout)
        )),
    }
}

async fn run(addr: SocketAddr, kind: &HealthKind) -> Result<(), String> {
    match kind {
        HealthKind::Tcp => {
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            Ok(())
        }
        HealthKind::Http { path, status } => {
            let mut stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let host = match addr.ip() {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            };
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: xlb-health\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("sending the request: {e}"))?;
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 512];
            while !head.contains(&b'\n') && head.len() < MAX_HTTP_HEAD {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("reading the answer: {e}"))?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&head);
            let line = text.lines().next().unwrap_or_default();
            let code = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| {
                    format!(
                        "not an HTTP answer: {:?}",
                        line.chars().take(60).collect::<String>()
                    )
                })?;
            if code != *status {
                return Err(format!("HTTP status {code} (expected {status})"));
            }
            Ok(())
        }
        HealthKind::Udp { send, expect } => {
            let local = match addr {
                SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            };
            let sock = tokio::net::UdpSocket::bind(local)
                .await
                .map_err(|e| format!("binding: {e}"))?;
            // Connected, so an ICMP port unreachable fails the check at once.
            sock.connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            sock.send(send.as_bytes())
                .await
                .map_err(|e| format!("send: {e}"))?;
            let mut buf = [0u8; 2048];
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            let reply = String::from_utf8_lossy(&buf[..n]);
            if !reply.contains(expect.as_str()) {
                return Err(format!(
                    "reply {:?} lacks {expect:?}",
                    reply.chars().take(60).collect::<String>()
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HealthConfig, HealthKind};

    fn spec(kind: HealthKind) -> HealthConfig {
        HealthConfig {
            kind,
            port: 0,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(300),
            rise: 2,
            fall: 3,
        }
    }

    /// Each kind against real sockets on loopback: up when answered, down
    /// with a reason when refused or answered wrongly.
    #[tokio::test]
    async fn every_kind_tells_up_from_down() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let tcp_addr = tcp.local_addr().expect("addr");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = tcp.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        assert!(check(tcp_addr, &spec(HealthKind::Tcp)).await.is_ok());
        let http = |status| HealthKind::Http {
            path: "/".into(),
            status,
        };
        assert!(check(tcp_addr, &spec(http(503))).await.is_ok());
        let wrong = check(tcp_addr, &spec(http(200)))
            .await
            .expect_err("503 is not 200");
        assert!(wrong.contains("503"), "{wrong}");

        // A port nobody listens on: refused.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        assert!(check(closed, &spec(HealthKind::Tcp)).await.is_err());

        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let udp_addr = udp.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(b"pong b1", from).await;
            }
        });
        let udp_kind = |expect: &str| HealthKind::Udp {
            send: "ping".into(),
            expect: expect.into(),
        };
        assert!(check(udp_addr, &spec(udp_kind("b1"))).await.is_ok());
        assert!(check(udp_addr, &spec(udp_kind("b9"))).await.is_err());
    }
}
