//! What nodes tell each other. Serialized as JSON inside the mesh's
//! authenticated frames ([`super::wire`]); names rather than ids everywhere,
//! because service and backend ids are each node's own.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::api::Request;
use crate::daemon::state::State;

/// Most sessions in one [`Message::Sessions`]: keeps frames far below the
/// mesh's 16 MiB limit (an entry is about 80 bytes of JSON).
pub const SESSIONS_PER_MESSAGE: usize = 8192;

/// A version of the cluster's document: last writer wins by (counter, node).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Version {
    /// Increases with every change the coordinator makes.
    pub counter: u64,
    /// The node that made it (breaks ties between two coordinators of a split).
    pub node: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.counter, self.node)
    }
}

/// What every node must agree on beyond the config file: the runtime
/// changes and the cluster's health verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Doc {
    /// Its version.
    pub version: Version,
    /// The runtime changes (the state file's contents).
    pub state: State,
    /// Checked backends the cluster holds down, as "service/backend".
    pub down: BTreeSet<String>,
}

/// One client's session, as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireSession {
    /// Service name.
    #[serde(rename = "s")]
    pub service: String,
    /// The masked client address, in the affinity key's word layout.
    #[serde(rename = "c")]
    pub client: [u32; 4],
    /// Backend name.
    #[serde(rename = "b")]
    pub backend: String,
    /// Milliseconds since the client was last seen on the sender (clocks
    /// of different nodes are not comparable; ages are).
    #[serde(rename = "a")]
    pub age_ms: u64,
}

/// One message between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Every second: the sender's view.
    Hello(Hello),
    /// The cluster's document. `prepare`: a new version to swap to once
    /// every live node said [`Message::Done`] for it; otherwise the version
    /// the sender has (a joining node adopts it at once).
    Doc {
        /// The document.
        doc: Doc,
        /// Whether this starts a prepare round.
        prepare: bool,
    },
    /// Sessions of the sender: divergent under a prepared version, its
    /// protected ones (full sync), or refreshed ones.
    Sessions {
        /// The entries (at most [`SESSIONS_PER_MESSAGE`]).
        entries: Vec<WireSession>,
    },
    /// Every session of the sender that `version` makes divergent is sent.
    Done {
        /// The prepared version.
        version: Version,
    },
    /// The sender's full sync to this node is complete.
    SyncDone,
    /// A runtime change asked on another node, for the coordinator to make.
    Change {
        /// The asking node's request id.
        id: u64,
        /// The control request.
        request: Request,
    },
    /// The coordinator's answer to a [`Message::Change`].
    ChangeResult {
        /// The request id.
        id: u64,
        /// What the CLI prints, or why it was refused.
        result: Result<String, String>,
    },
    /// `xlb sessions flush` made on another node.
    Flush {
        /// Service name, all when absent.
        service: Option<String>,
        /// Backend name, all when absent.
        backend: Option<String>,
    },
}

/// A node's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Fingerprint of the sender's services, backends and tables.
    pub fingerprint: String,
    /// The document version the sender runs.
    pub version: Version,
    /// Whether the sender has its full sync.
    pub synced: bool,
    /// The sender's own health checks: "service/backend" → up.
    pub health: BTreeMap<String, bool>,
    /// Sessions the sender still has on draining backends, "service/backend" → count.
    pub draining: BTreeMap<String, u64>,
}

impl Message {
    /// The JSON body of a frame.
    pub fn encode(&self) -> bytes::Bytes {
        // Serializing these plain structs cannot fail (string keys, no floats).
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses a frame's body.
    pub fn decode(body: &[u8]) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        serde_json::from_slice(body).context("an authenticated cluster message that is not valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_unknown_fields_are_refused() {
        let m = Message::Sessions {
            entries: vec![WireSession {
                service: "web".into(),
                client: [0x0a00_0001, 0, 0, 0],
                backend: "b1".into(),
                age_ms: 1500,
            }],
        };
        let body = m.encode();
        match Message::decode(&body).expect("decodes") {
            Message::Sessions { entries } => assert_eq!(entries[0].backend, "b1"),
            other => panic!("{other:?}"),
        }
        assert!(
            Message::decode(br#"{"type":"done","version":{"counter":1,"node":2},"x":1}"#).is_err()
        );
        assert!(Message::decode(br#"{"type":"done","version":{"counter":1,"node":2}}"#).is_ok());
        assert!(Message::decode(b"not json").is_err());
        assert!(
            Version {
                counter: 2,
                node: 1
            } > Version {
                counter: 1,
                node: 3
            } && Version {
                counter: 2,
                node: 3
            } > Version {
                counter: 2,
                node: 1
            }
        );
    }
}
