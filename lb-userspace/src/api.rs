//! The control protocol between `xlb` CLI calls and the daemon.
//!
//! One request per connection on the Unix socket: the client writes one JSON
//! line (a [`Request`]), the daemon answers with one JSON line (a
//! [`Response`]) and closes. Both are plain serde types, so the CLI, tests
//! and scripts share one definition.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";
/// Largest request or response line accepted (a session list can be long).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response line a client accepts.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Daemon, dataplane and health summary.
    Status,
    /// Every service.
    ServiceList,
    /// Backends of one service, or of all.
    BackendList {
        /// Service name; all when absent.
        service: Option<String>,
    },
    /// Adds a backend to a service at runtime.
    BackendAdd {
        /// Service name.
        service: String,
        /// Backend name; default the address.
        name: Option<String>,
        /// Backend address.
        address: IpAddr,
        /// Backend MAC; "" (or absent): resolved from the kernel's neighbours.
        #[serde(default)]
        mac: String,
        /// Maglev weight; default 1.
        weight: Option<u16>,
    },
    /// Removes a backend (its clients move to their Maglev choice).
    BackendRemove {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
    },
    /// Drains a backend: no new clients; maint when its sessions are gone or at the deadline.
    BackendDrain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// Milliseconds until the leftover clients are moved; none waits for them.
        deadline_ms: Option<u64>,
    },
    /// Makes a draining or maint backend active again.
    BackendUndrain {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
    },
    /// Changes a backend's Maglev weight.
    BackendWeight {
        /// Service name.
        service: String,
        /// Backend name.
        backend: String,
        /// New weight, 1..=65535.
        weight: u16,
    },
    /// Sticky sessions, optionally of one service and/or backend.
    SessionsList {
        /// Service name filter.
        service: Option<String>,
        /// Backend name filter.
        backend: Option<String>,
    },
    /// Where a client goes, per service of its family.
    SessionsWhere {
        /// The client address.
        client: IpAddr,
        /// Service name filter.
        service: Option<String>,
    },
    /// Deletes sessions (their clients are re-balanced on their next packet).
    SessionsFlush {
        /// Service name filter.
        service: Option<String>,
        /// Backend name filter.
        backend: Option<String>,
    },
    /// Dataplane counters.
    Stats,
    /// Re-reads the config file and applies the difference.
    Reload,
    /// The cluster as this node sees it.
    ClusterStatus,
}

impl Request {
    /// Whether it is one of the runtime changes of a backend (`xlb backend
    /// add|remove|drain|undrain|weight`).
    pub fn is_backend_change(&self) -> bool {
        matches!(
            self,
            Self::BackendAdd { .. }
                | Self::BackendRemove { .. }
                | Self::BackendDrain { .. }
                | Self::BackendUndrain { .. }
                | Self::BackendWeight { .. }
        )
    }
}

/// Fields each op takes besides `op`, so unknown fields are refused for every
/// op (serde's `deny_unknown_fields` lets them through on ops without fields).
const OP_FIELDS: &[(&str, &[&str])] = &[
    ("status", &[]),
    ("service_list", &[]),
    ("backend_list", &["service"]),
    (
        "backend_add",
        &["service", "name", "address", "mac", "weight"],
    ),
    ("backend_remove", &["service", "backend"]),
    ("backend_drain", &["service", "backend", "deadline_ms"]),
    ("backend_undrain", &["service", "backend"]),
    ("backend_weight", &["service", "backend", "weight"]),
    ("sessions_list", &["service", "backend"]),
    ("sessions_where", &["client", "service"]),
    ("sessions_flush", &["service", "backend"]),
    ("stats", &[]),
    ("reload", &[]),
    ("cluster_status", &[]),
];

/// Decodes one request line (trailing newline allowed), refusing invalid
/// UTF-8, bad JSON, unknown ops and unknown fields with a message that names
/// the problem.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|e| format!("request is not UTF-8: {e}"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty request: send one JSON object on one line".to_string());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("request is not valid JSON: {e}"))?;
    let serde_json::Value::Object(fields) = &value else {
        return Err("request must be a JSON object with an \"op\" field".to_string());
    };
    let op = match fields.get("op") {
        Some(serde_json::Value::String(op)) => op.clone(),
        Some(_) => return Err("\"op\" must be a string".to_string()),
        None => return Err("request has no \"op\" field".to_string()),
    };
    let Some((_, allowed)) = OP_FIELDS.iter().find(|(name, _)| *name == op.as_str()) else {
        let ops: Vec<&str> = OP_FIELDS.iter().map(|(name, _)| *name).collect();
        return Err(format!("unknown op \"{op}\" (known: {})", ops.join(", ")));
    };
    if let Some(bad) = fields
        .keys()
        .find(|k| k.as_str() != "op" && !allowed.contains(&k.as_str()))
    {
        let takes = if allowed.is_empty() {
            "it takes no fields".to_string()
        } else {
            format!("it takes {}", allowed.join(", "))
        };
        return Err(format!("unknown field \"{bad}\" for op \"{op}\": {takes}"));
    }
    serde_json::from_value(value).map_err(|e| format!("bad request for op \"{op}\": {e}"))
}

/// Why a request failed: a stable kind for scripts, a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of failure (stable names, in `--json` output).
    pub kind: FailureKind,
    /// What happened, for people.
    pub message: String,
}

/// The kinds of [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The request itself is wrong (unknown op or field, a bad value): nothing changed.
    Invalid,
    /// It names a service or backend that does not exist: nothing changed.
    NotFound,
    /// The daemon cannot take it now (its connection cap): try again.
    Busy,
    /// It was refused or rolled back (the state file or the kernel refused it): nothing changed.
    NotApplied,
    /// It was recorded, but it did not reach the kernel or the cluster in time, or
    /// only in part: the daemon retries; `xlb status` says where it stands.
    UnknownOutcome,
    /// The daemon is shutting down.
    ShuttingDown,
    /// No daemon answers on the socket (said by the CLI, not the daemon).
    Unavailable,
    /// A read failed (the kernel refused a map read, ...).
    Failed,
}

impl FailureKind {
    /// Its name, as in `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::NotFound => "not_found",
            Self::Busy => "busy",
            Self::NotApplied => "not_applied",
            Self::UnknownOutcome => "unknown_outcome",
            Self::ShuttingDown => "shutting_down",
            Self::Unavailable => "unavailable",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The kind an error chain carries (a [`Failure`] in it), else `default`,
    /// with the whole chain as the message.
    pub fn of(e: &anyhow::Error, default: FailureKind) -> Self {
        let kind = e
            .chain()
            .find_map(|c| c.downcast_ref::<Failure>().map(|f| f.kind))
            .unwrap_or(default);
        Self::new(kind, format!("{e:#}"))
    }
}

/// Most sessions one `xlb sessions list` returns: at millions of sessions
/// the whole map is gigabytes of JSON. The CLI says when it was reached.
pub const MAX_SESSIONS_LISTED: usize = 100_000;

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum Response {
    /// The request failed (see [`FailureKind`] for what changed).
    Error(Failure),
    /// A change was made; what happened, for people.
    Done(String),
    /// Answer to `Status`.
    Status(StatusInfo),
    /// Answer to `ServiceList`.
    Services(Vec<ServiceInfo>),
    /// Answer to `BackendList`.
    Backends(Vec<BackendInfo>),
    /// Answer to `SessionsList`.
    Sessions(Vec<SessionInfo>),
    /// Answer to `SessionsWhere`.
    Where(Vec<WhereInfo>),
    /// Answer to `Stats`.
    Stats(crate::stats::Snapshot),
    /// Answer to `ClusterStatus`.
    Cluster(ClusterInfo),
}

impl Response {
    /// A failure of `kind`.
    pub fn error(kind: FailureKind, message: impl Into<String>) -> Self {
        Self::Error(Failure::new(kind, message))
    }
}

/// `xlb cluster status`: this node, its peers and the replication totals.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterInfo {
    /// This node's id.
    pub node_id: u32,
    /// The node that makes new versions now (lowest live id).
    pub coordinator: u32,
    /// The document version this node runs ("counter.node").
    pub version: String,
    /// Fingerprint of this node's services, backends and tables.
    pub fingerprint: String,
    /// Whether this node has its peers' full sync (it announces only then).
    pub synced: bool,
    /// A prepare round in progress: its version and the peers it waits for.
    pub round: Option<String>,
    /// Every configured peer.
    pub peers: Vec<PeerInfo>,
    /// Peers whose fingerprint differs from this node's (config drift).
    pub drift: Vec<u32>,
    /// Versions made live here since start, and rounds that stopped waiting for a peer.
    pub rounds: u64,
    /// Rounds that swapped without some peer's Done (dead or too slow).
    pub rounds_gave_up: u64,
    /// Sessions sent to peers (entries, each peer counted).
    pub sessions_sent: u64,
    /// Sessions received from peers.
    pub sessions_received: u64,
    /// Sessions written into the protected map from peers.
    pub sessions_imported: u64,
    /// Received sessions that lost to this node's own fresher answer.
    pub sessions_conflicts_lost: u64,
    /// Received sessions naming what this node lacks.
    pub sessions_unknown: u64,
    /// Frames rejected: bad HMAC (wrong key, forged, corrupted).
    pub rejected_auth: u64,
    /// Frames rejected: replayed (old sequence or outside the time window).
    pub rejected_replay: u64,
    /// Frames rejected: for another node, from an unknown node, or malformed.
    pub rejected_other: u64,
    /// Replication bytes sent and received (frames, all peers).
    pub bytes_sent: u64,
    /// Replication bytes received.
    pub bytes_received: u64,
}

/// One peer as this node sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node id.
    pub id: u32,
    /// Its replication address.
    pub address: String,
    /// "live" (Hello within 3 s), "connected" (link up, no Hello yet) or "down".
    pub state: String,
    /// Milliseconds since its last Hello.
    pub last_hello_ms: Option<u64>,
    /// The version it runs.
    pub version: Option<String>,
    /// Versions it is behind this node (negative: ahead).
    pub lag: i64,
    /// Its fingerprint.
    pub fingerprint: Option<String>,
    /// Whether it has its full sync.
    pub synced: bool,
    /// Whether it sent this node a complete full sync since its link came up.
    pub sync_received: bool,
    /// Frames and bytes this node sent it and received from it.
    pub frames_sent: u64,
    /// Bytes sent to it.
    pub bytes_sent: u64,
    /// Frames received from it.
    pub frames_received: u64,
    /// Bytes received from it.
    pub bytes_received: u64,
}

/// Daemon summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    /// Daemon process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    /// Config file path.
    pub config: String,
    /// State file path.
    pub state_file: String,
    /// Interface XDP is attached to.
    pub interface: String,
    /// Pin directory.
    pub pins: String,
    /// Whether the XDP link was adopted from an earlier run (vs attached anew).
    pub adopted: bool,
    /// Number of services.
    pub services: usize,
    /// Number of backends, and how many are usable (active, healthy).
    pub backends: usize,
    /// Backends taking new clients.
    pub backends_up: usize,
    /// Services in panic mode (every backend failing its checks).
    pub panic_services: Vec<String>,
    /// Sessions (affinity entries), protected ones included.
    pub sessions: usize,
    /// Sessions in the protected map (their backend differs from the Maglev answer).
    #[serde(default)]
    pub protected_sessions: usize,
    /// How old the session counts are, in ms (they are walked beside the
    /// daemon's owner; `None`: not counted yet).
    #[serde(default)]
    pub sessions_counted_ms_ago: Option<u64>,
    /// Whether the kernel holds the desired state (false after a failed write, until reconcile repairs it).
    #[serde(default)]
    pub in_sync: bool,
    /// Why the last write to the kernel failed, while it is not repaired.
    #[serde(default)]
    pub last_write_error: Option<String>,
    /// Differences between the kernel and the desired state repaired since start.
    #[serde(default)]
    pub reconcile_repairs: u64,
    /// Fingerprint of the services, backends and tables the kernel was given
    /// (equal on every node of a cluster that answers alike).
    #[serde(default)]
    pub fingerprint: String,
}

/// One service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Name.
    pub name: String,
    /// Service id in the dataplane.
    pub id: u32,
    /// VIP.
    pub vip: IpAddr,
    /// Port.
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    /// Number of backends.
    pub backends: usize,
    /// Backends taking new clients.
    pub backends_up: usize,
    /// Whether every backend fails its checks (panic mode: all are used anyway).
    pub panic: bool,
    /// Health check summary, if configured.
    pub health: Option<String>,
}

/// One backend of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendInfo {
    /// Service name.
    pub service: String,
    /// Backend name.
    pub name: String,
    /// Backend id in the dataplane.
    pub id: u32,
    /// Address.
    pub address: IpAddr,
    /// MAC.
    pub mac: String,
    /// Maglev weight.
    pub weight: u16,
    /// Administrative state: "active", "draining" or "maint".
    pub admin: String,
    /// Health: "up", "down" or "unchecked".
    pub health: String,
    /// What the kernel sees: "active", "draining" or "down".
    pub state: String,
    /// Fresh affinity entries pointing at this backend.
    pub sessions: u64,
    /// Milliseconds left before a drain moves the leftover clients.
    pub drain_left_ms: Option<u64>,
    /// Why the backend last changed health, if it did.
    pub reason: Option<String>,
}

/// One sticky session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    /// Service name.
    pub service: String,
    /// Client address, masked to the service prefix.
    pub client: IpAddr,
    /// Prefix length.
    pub prefix: u8,
    /// Backend name ("#id" if unknown).
    pub backend: String,
    /// Backend address, if known.
    pub backend_address: Option<IpAddr>,
    /// Milliseconds since last refresh.
    pub idle_ms: u64,
    /// Kept in the protected map (its backend differs from the Maglev answer).
    #[serde(default)]
    pub protected: bool,
}

/// Where one client goes in one service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WhereInfo {
    /// Service name.
    pub service: String,
    /// Client address masked to the service prefix.
    pub client: IpAddr,
    /// Backend name, if any is usable: the session's, else the Maglev answer.
    pub backend: Option<String>,
    /// Backend address.
    pub backend_address: Option<IpAddr>,
    /// "session" (an affinity entry decides) or "maglev" (none: the table decides).
    pub source: String,
    /// Whether the session is kept in the protected map (it differs from
    /// the Maglev answer, so no LRU eviction may lose it).
    #[serde(default)]
    pub protected: bool,
    /// Milliseconds since the session was refreshed ("session" only).
    pub idle_ms: Option<u64>,
    /// Whether the entry is past the affinity timeout (the next packet re-selects).
    pub expired: bool,
    /// What the live Maglev table answers for this client, session or not:
    /// a client whose session differs depends on its affinity entry.
    #[serde(default)]
    pub maglev_backend: Option<String>,
    /// Address of [`WhereInfo::maglev_backend`].
    #[serde(default)]
    pub maglev_backend_address: Option<IpAddr>,
}

/// Sends one request to the daemon at `socket` and returns its answer.
///
/// A missing socket or a refused connection become one line saying the
/// daemon is not running.
pub async fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(Failure::new(
                FailureKind::Unavailable,
                format!(
                    "no xlb daemon is running (nothing listens on {}; start one with `xlb daemon --config FILE`)",
                    socket.display()
                ),
            )
            .into());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", socket.display()));
        }
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).context("encoding the request")?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .context("sending the request")?;
    write.shutdown().await.context("sending the request")?;
    let mut reader = BufReader::new(read).take(MAX_RESPONSE_BYTES as u64);
    let mut answer = String::new();
    // A reload or a large flush may take a while; a wedged daemon must not hang the CLI.
    tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut answer))
        .await
        .context("the daemon did not answer within 60 s")?
        .context("reading the answer")?;
    if answer.trim().is_empty() {
        bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&answer).context("decoding the daemon's answer")
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn a_failure_keeps_its_kind_through_context_and_on_the_wire() {
        let e = anyhow::Error::new(Failure::new(
            FailureKind::NotFound,
            "no service named \"x\"",
        ))
        .context("sessions list");
        let f = Failure::of(&e, FailureKind::Failed);
        assert_eq!(f.kind, FailureKind::NotFound);
        assert_eq!(f.message, "sessions list: no service named \"x\"");
        // Nothing typed in the chain: the caller's default.
        let plain = anyhow::anyhow!("the state file could not be written");
        assert_eq!(
            Failure::of(&plain, FailureKind::NotApplied).kind,
            FailureKind::NotApplied
        );
        let wire = serde_json::to_string(&Response::Error(f)).expect("encode");
        assert_eq!(
            wire,
            r#"{"kind":"error","data":{"kind":"not_found","message":"sessions list: no service named \"x\""}}"#
        );
        for kind in [
            FailureKind::Invalid,
            FailureKind::NotFound,
            FailureKind::Busy,
            FailureKind::NotApplied,
            FailureKind::UnknownOutcome,
            FailureKind::ShuttingDown,
            FailureKind::Unavailable,
            FailureKind::Failed,
        ] {
            let on_wire = serde_json::to_value(kind).expect("encode");
            assert_eq!(
                on_wire,
                kind.name(),
                "the name scripts see is the one on the wire"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request of every op with every optional field set, so a new op or
    /// field that [`OP_FIELDS`] misses fails here.
    fn every_request() -> Vec<Request> {
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let s = || Some("x".to_string());
        let all = vec![
            Request::Status,
            Request::ServiceList,
            Request::BackendList { service: s() },
            Request::BackendAdd {
                service: "web".into(),
                name: s(),
                address: ip,
                mac: "02:00:00:00:00:01".into(),
                weight: Some(2),
            },
            Request::BackendRemove {
                service: "web".into(),
                backend: "b".into(),
            },
            Request::BackendDrain {
                service: "web".into(),
                backend: "b".into(),
                deadline_ms: Some(5),
            },
            Request::BackendUndrain {
                service: "web".into(),
                backend: "b".into(),
            },
            Request::BackendWeight {
                service: "web".into(),
                backend: "b".into(),
                weight: 3,
            },
            Request::SessionsList {
                service: s(),
                backend: s(),
            },
            Request::SessionsWhere {
                client: ip,
                service: s(),
            },
            Request::SessionsFlush {
                service: s(),
                backend: s(),
            },
            Request::Stats,
            Request::Reload,
            Request::ClusterStatus,
        ];
        // Exhaustive: a new variant does not compile until it is listed above.
        for r in &all {
            match r {
                Request::Status
                | Request::ServiceList
                | Request::BackendList { .. }
                | Request::BackendAdd { .. }
                | Request::BackendRemove { .. }
                | Request::BackendDrain { .. }
                | Request::BackendUndrain { .. }
                | Request::BackendWeight { .. }
                | Request::SessionsList { .. }
                | Request::SessionsWhere { .. }
                | Request::SessionsFlush { .. }
                | Request::Stats
                | Request::Reload
                | Request::ClusterStatus => {}
            }
        }
        all
    }

    #[test]
    fn field_table_matches_the_request_type() {
        let all = every_request();
        assert_eq!(all.len(), OP_FIELDS.len(), "one table row per op");
        for r in all {
            let value = serde_json::to_value(&r).expect("encode");
            let obj = value.as_object().expect("object");
            let op = obj["op"].as_str().expect("op");
            let (_, allowed) = OP_FIELDS
                .iter()
                .find(|(name, _)| *name == op)
                .unwrap_or_else(|| panic!("op {op} missing from OP_FIELDS"));
            let mut keys: Vec<&str> = obj
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "op")
                .collect();
            let mut want = allowed.to_vec();
            keys.sort_unstable();
            want.sort_unstable();
            assert_eq!(keys, want, "fields of {op}");
            let line = serde_json::to_vec(&r).expect("encode");
            assert_eq!(decode_request(&line), Ok(r), "round trip of {op}");
        }
    }

    #[test]
    fn unknown_field_on_an_op_without_fields() {
        let e = decode_request(br#"{"op":"status","bogus":1}"#).expect_err("refused");
        assert_eq!(
            e,
            r#"unknown field "bogus" for op "status": it takes no fields"#
        );
        assert!(decode_request(b"{\"op\":\"reload\",\"x\":null}\n").is_err());
        assert_eq!(
            decode_request(b"{\"op\":\"status\"}\n"),
            Ok(Request::Status)
        );
    }

    #[test]
    fn unknown_field_on_an_op_with_fields() {
        let e = decode_request(
            br#"{"op":"backend_add","service":"web","address":"10.0.0.9","mac":"02:00:00:00:00:09","wieght":2}"#,
        )
        .expect_err("refused");
        assert_eq!(
            e,
            r#"unknown field "wieght" for op "backend_add": it takes service, name, address, mac, weight"#
        );
    }

    #[test]
    fn invalid_utf8_is_named() {
        let e = decode_request(b"{\"op\":\"st\xffatus\"}").expect_err("refused");
        assert!(e.starts_with("request is not UTF-8"), "{e}");
    }

    #[test]
    fn missing_or_unknown_op() {
        assert_eq!(
            decode_request(br#"{"service":"web"}"#),
            Err(r#"request has no "op" field"#.to_string())
        );
        assert_eq!(
            decode_request(br#"{"op":7}"#),
            Err(r#""op" must be a string"#.to_string())
        );
        let e = decode_request(br#"{"op":"explode"}"#).expect_err("refused");
        assert!(
            e.starts_with(r#"unknown op "explode" (known: status, "#),
            "{e}"
        );
        let e = decode_request(b"[1,2]").expect_err("refused");
        assert!(e.contains("JSON object"), "{e}");
        let e = decode_request(b"  \n").expect_err("refused");
        assert!(e.starts_with("empty request"), "{e}");
        let e = decode_request(b"{\"op\":").expect_err("refused");
        assert!(e.starts_with("request is not valid JSON"), "{e}");
    }

    #[test]
    fn bad_types_and_missing_fields() {
        let e = decode_request(
            br#"{"op":"backend_weight","service":"web","backend":"b","weight":"heavy"}"#,
        )
        .expect_err("refused");
        assert!(
            e.starts_with(r#"bad request for op "backend_weight": invalid type"#),
            "{e}"
        );
        let e = decode_request(
            br#"{"op":"backend_weight","service":"web","backend":"b","weight":70000}"#,
        )
        .expect_err("refused");
        assert!(e.contains("70000"), "{e}");
        let e = decode_request(br#"{"op":"sessions_where","client":"not-an-ip"}"#)
            .expect_err("refused");
        assert!(
            e.starts_with(r#"bad request for op "sessions_where""#),
            "{e}"
        );
        let e = decode_request(br#"{"op":"backend_remove","service":"web"}"#).expect_err("refused");
        assert!(e.contains("missing field `backend`"), "{e}");
    }
}
