//! Frames of the cluster channel: length prefix, fixed header, opaque body, HMAC-SHA256 tag; sealing and checking.
//!
//! On the stream: `u32` big-endian length of what follows, then the 40-byte [`Header`], the body and a
//! 32-byte tag = HMAC-SHA256(key, header || body). Verification is split: [`authenticate`] is stateless
//! (any connection task may run it), [`Opener::accept`] holds the replay state and must have one owner.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// First bytes of every header.
pub const MAGIC: [u8; 4] = *b"XLBC";
/// The only header version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Bytes of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Largest length field accepted; anything larger is refused before it is read.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Smallest length field (empty body).
pub const MIN_FRAME: usize = HEADER_LEN + TAG_LEN;
/// Largest body that fits in a frame.
pub const MAX_BODY: usize = MAX_FRAME - MIN_FRAME;
/// Shortest cluster key `load_key` accepts, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// The authenticated fields of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Node id of the sender.
    pub sender: u32,
    /// Node id the frame is addressed to.
    pub receiver: u32,
    /// The sender process's start time in unix ns; larger after a restart.
    pub incarnation: u64,
    /// Per sender→receiver sequence number, from 1 in each incarnation.
    pub seq: u64,
    /// The sender's wall clock when it sealed the frame, unix ms.
    pub sent_unix_ms: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_be_bytes());
        // h[6..8]: reserved, zero.
        h[8..12].copy_from_slice(&self.sender.to_be_bytes());
        h[12..16].copy_from_slice(&self.receiver.to_be_bytes());
        h[16..24].copy_from_slice(&self.incarnation.to_be_bytes());
        h[24..32].copy_from_slice(&self.seq.to_be_bytes());
        h[32..40].copy_from_slice(&self.sent_unix_ms.to_be_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, Reject> {
        if h[0..4] != MAGIC || u16::from_be_bytes([h[4], h[5]]) != VERSION {
            return Err(Reject::Malformed);
        }
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        Ok(Header {
            sender: u32_at(8),
            receiver: u32_at(12),
            incarnation: u64_at(16),
            seq: u64_at(24),
            sent_unix_ms: u64_at(32),
        })
    }
}

/// Why a frame was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// The tag does not match: another key, or bytes changed on the way.
    Auth,
    /// Authentic but not newer than what was accepted, or sent outside the time window.
    Replay,
    /// Authentic but addressed to another node, or sent by a node that is not a configured peer.
    Misdirected,
    /// Impossible length, wrong magic or unknown version.
    Malformed,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reject::Auth => "bad HMAC: wrong cluster key or corrupted frame",
            Reject::Replay => {
                "replayed or stale frame: not newer than the last one accepted from that peer, \
                 or its send time is outside the window (check the nodes' clocks)"
            }
            Reject::Misdirected => {
                "misdirected frame: addressed to another node id, or sent by a node id that is not \
                 in this node's peer list (check the cluster configuration on both nodes)"
            }
            Reject::Malformed => {
                "malformed frame: impossible length, wrong magic or unsupported version (not an xlb cluster peer?)"
            }
        })
    }
}

impl std::error::Error for Reject {}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (RFC 2104 hashes long ones, pads short ones): this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// Seals outgoing frames: numbers them per receiver and appends the tag.
pub struct Sealer {
    mac: HmacSha256,
    node_id: u32,
    incarnation: u64,
    next_seq: HashMap<u32, u64>,
}

impl Sealer {
    /// A sealer for node `node_id` in its process incarnation `incarnation` (start time, unix ns).
    pub fn new(key: &[u8], node_id: u32, incarnation: u64) -> Self {
        Sealer {
            mac: keyed(key),
            node_id,
            incarnation,
            next_seq: HashMap::new(),
        }
    }

    /// The whole frame for `body` to `receiver`, length prefix included; takes the next sequence number.
    pub fn seal(&mut self, receiver: u32, body: &[u8], now_unix_ms: u64) -> Vec<u8> {
        let next = self.next_seq.entry(receiver).or_insert(1);
        let seq = *next;
        *next += 1;
        let header = Header {
            sender: self.node_id,
            receiver,
            incarnation: self.incarnation,
            seq,
            sent_unix_ms: now_unix_ms,
        }
        .encode();
        let len = HEADER_LEN + body.len() + TAG_LEN;
        let mut frame = Vec::with_capacity(LEN_PREFIX + len);
        // A body over MAX_BODY would be refused by every receiver; callers check, and the
        // saturating length makes such a frame fail there rather than wrap into a small one.
        frame.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(body);
        let mut mac = self.mac.clone();
        mac.update(&header);
        mac.update(body);
        frame.extend_from_slice(&mac.finalize().into_bytes());
        frame
    }
}

/// Checks length, tag (constant time), magic and version of `frame` (without its length prefix).
pub fn authenticate(key: &[u8], frame: &[u8]) -> Result<Header, Reject> {
    if frame.len() < MIN_FRAME || frame.len() > MAX_FRAME {
        return Err(Reject::Malformed);
    }
    let (signed, tag) = frame.split_at(frame.len() - TAG_LEN);
    let mut mac = keyed(key);
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| Reject::Auth)?;
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&frame[..HEADER_LEN]);
    Header::decode(&h)
}

/// The body of a frame (without its length prefix) that [`authenticate`] accepted.
pub fn body(frame: &[u8]) -> &[u8] {
    frame
        .get(HEADER_LEN..frame.len().saturating_sub(TAG_LEN))
        .unwrap_or(&[])
}

/// Decides whether an authentic frame is for this node, from a peer, in time and new; one owner per node.
pub struct Opener {
    node_id: u32,
    peers: BTreeSet<u32>,
    window_ms: u64,
    last: HashMap<u32, (u64, u64)>,
}

impl Opener {
    /// An opener for node `node_id` accepting frames from `peers` sent within `window` of its clock.
    pub fn new(
        _key: &[u8],
        node_id: u32,
        peers: impl IntoIterator<Item = u32>,
        window: Duration,
    ) -> Self {
        Opener {
            node_id,
            peers: peers.into_iter().filter(|&p| p != node_id).collect(),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            last: HashMap::new(),
        }
    }

    /// Accepts `header` if it is addressed here, from a peer, in time and newer than the last one
    /// accepted from that peer (gaps allowed); remembers it.
    pub fn accept(&mut self, header: &Header, now_unix_ms: u64) -> Result<(), Reject> {
        if header.receiver != self.node_id || !self.peers.contains(&header.sender) {
            return Err(Reject::Misdirected);
        }
        if header.sent_unix_ms.abs_diff(now_unix_ms) > self.window_ms {
            return Err(Reject::Replay);
        }
        let this = (header.incarnation, header.seq);
        if let Some(&last) = self.last.get(&header.sender)
            && this <= last
        {
            return Err(Reject::Replay);
        }
        self.last.insert(header.sender, this);
        Ok(())
    }
}

/// Reads the cluster key from `path`: text, whitespace trimmed, at least 32 bytes, mode without group/other bits.
pub fn load_key(path: &Path) -> Result<Vec<u8>> {
    let meta = fs::metadata(path)
        .with_context(|| format!("reading the cluster key file {}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "cluster key file {} is accessible by group or others (mode {:o}); restrict it with: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let text = fs::read(path)
        .with_context(|| format!("reading the cluster key file {}", path.display()))?;
    let key = text.trim_ascii();
    if key.len() < MIN_KEY_LEN {
        bail!(
            "cluster key in {} is {} bytes, at least {MIN_KEY_LEN} are needed; generate one with: \
             head -c 32 /dev/urandom | base64",
            path.display(),
            key.len()
        );
    }
    Ok(key.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000_000;
    const WINDOW: Duration = Duration::from_secs(30);

    fn opener() -> Opener {
        Opener::new(KEY, 2, [1, 3], WINDOW)
    }

    /// Seals and authenticates one frame; returns its header and body.
    fn open(frame: &[u8]) -> Result<(Header, Vec<u8>), Reject> {
        let inner = &frame[LEN_PREFIX..];
        let h = authenticate(KEY, inner)?;
        Ok((h, body(inner).to_vec()))
    }

    #[test]
    fn roundtrip() {
        let mut s = Sealer::new(KEY, 1, 77);
        let frame = s.seal(2, b"hello", NOW);
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - LEN_PREFIX);
        assert_eq!(len, HEADER_LEN + 5 + TAG_LEN);
        let (h, b) = open(&frame).unwrap();
        assert_eq!(
            h,
            Header {
                sender: 1,
                receiver: 2,
                incarnation: 77,
                seq: 1,
                sent_unix_ms: NOW
            }
        );
        assert_eq!(b, b"hello");
        let mut o = opener();
        assert_eq!(o.accept(&h, NOW + 10), Ok(()));
        // Sequence numbers are per receiver.
        let (h2, _) = open(&s.seal(2, b"", NOW)).unwrap();
        let (h3, _) = open(&s.seal(3, b"", NOW)).unwrap();
        assert_eq!((h2.seq, h3.seq), (2, 1));
        assert_eq!(o.accept(&h2, NOW), Ok(()));
    }

    #[test]
    fn header_layout_is_big_endian() {
        let mut s = Sealer::new(KEY, 0x0102_0304, 0x1112_1314_1516_1718);
        let f = s.seal(0x0506_0708, b"", 0x2122_2324_2526_2728);
        assert_eq!(&f[4..8], b"XLBC");
        assert_eq!(&f[8..12], &[0, 1, 0, 0]);
        assert_eq!(&f[12..16], &[1, 2, 3, 4]);
        assert_eq!(&f[16..20], &[5, 6, 7, 8]);
        assert_eq!(
            &f[20..28],
            &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
        );
        assert_eq!(&f[28..36], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            &f[36..44],
            &[0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]
        );
    }

    #[test]
    fn wrong_key_or_flipped_byte_is_auth() {
        let frame = Sealer::new(b"another key, also 32 bytes long!", 1, 1).seal(2, b"body", NOW);
        assert_eq!(open(&frame).unwrap_err(), Reject::Auth);
        let mut frame = Sealer::new(KEY, 1, 1).seal(2, b"body", NOW);
        frame[LEN_PREFIX + HEADER_LEN + 1] ^= 1;
        assert_eq!(open(&frame).unwrap_err(), Reject::Auth);
        // A changed header field (sequence number) is caught too.
        let mut frame = Sealer::new(KEY, 1, 1).seal(2, b"body", NOW);
        frame[LEN_PREFIX + 31] ^= 1;
        assert_eq!(open(&frame).unwrap_err(), Reject::Auth);
    }

    #[test]
    fn same_frame_twice_or_older_seq_is_replay() {
        let mut s = Sealer::new(KEY, 1, 5);
        let (h1, _) = open(&s.seal(2, b"a", NOW)).unwrap();
        let (h2, _) = open(&s.seal(2, b"b", NOW)).unwrap();
        let mut o = opener();
        assert_eq!(o.accept(&h1, NOW), Ok(()));
        assert_eq!(o.accept(&h1, NOW), Err(Reject::Replay));
        assert_eq!(o.accept(&h2, NOW), Ok(()));
        assert_eq!(o.accept(&h1, NOW), Err(Reject::Replay));
        // Gaps are fine: the logic above resyncs.
        let h9 = Header { seq: 9, ..h2 };
        assert_eq!(o.accept(&h9, NOW), Ok(()));
        // Replay state is per sender: node 3 starts fresh.
        let h3 = Header {
            sender: 3,
            seq: 1,
            ..h1
        };
        assert_eq!(o.accept(&h3, NOW), Ok(()));
    }

    #[test]
    fn incarnations_order_before_seq() {
        let mut o = opener();
        let old = Header {
            sender: 1,
            receiver: 2,
            incarnation: 100,
            seq: 50,
            sent_unix_ms: NOW,
        };
        let new = Header {
            incarnation: 200,
            seq: 1,
            ..old
        };
        assert_eq!(o.accept(&old, NOW), Ok(()));
        assert_eq!(o.accept(&new, NOW), Ok(()));
        assert_eq!(
            o.accept(&Header { seq: 51, ..old }, NOW),
            Err(Reject::Replay)
        );
        assert_eq!(o.accept(&Header { seq: 2, ..new }, NOW), Ok(()));
    }

    #[test]
    fn sent_time_outside_window_is_replay() {
        let mut o = opener();
        let h = Header {
            sender: 1,
            receiver: 2,
            incarnation: 1,
            seq: 1,
            sent_unix_ms: NOW,
        };
        let w = WINDOW.as_millis() as u64;
        assert_eq!(o.accept(&h, NOW + w + 1), Err(Reject::Replay));
        assert_eq!(o.accept(&h, NOW - w - 1), Err(Reject::Replay));
        // The rejected frames left no state: the same frame inside the window passes.
        assert_eq!(o.accept(&h, NOW + w), Ok(()));
        assert_eq!(o.accept(&Header { seq: 2, ..h }, NOW - w), Ok(()));
    }

    #[test]
    fn other_receiver_or_unknown_sender_is_misdirected() {
        let mut o = opener();
        let h = Header {
            sender: 1,
            receiver: 3,
            incarnation: 1,
            seq: 1,
            sent_unix_ms: NOW,
        };
        assert_eq!(o.accept(&h, NOW), Err(Reject::Misdirected));
        assert_eq!(
            o.accept(
                &Header {
                    sender: 9,
                    receiver: 2,
                    ..h
                },
                NOW
            ),
            Err(Reject::Misdirected)
        );
        // Frames claiming to come from this node itself are not from a peer.
        assert_eq!(
            o.accept(
                &Header {
                    sender: 2,
                    receiver: 2,
                    ..h
                },
                NOW
            ),
            Err(Reject::Misdirected)
        );
        assert_eq!(o.accept(&Header { receiver: 2, ..h }, NOW), Ok(()));
    }

    #[test]
    fn truncated_oversized_or_foreign_frames_are_malformed() {
        let frame = Sealer::new(KEY, 1, 1).seal(2, b"", NOW);
        assert_eq!(
            authenticate(KEY, &frame[LEN_PREFIX..frame.len() - 1]),
            Err(Reject::Malformed)
        );
        assert_eq!(authenticate(KEY, &[]), Err(Reject::Malformed));
        assert_eq!(
            authenticate(KEY, &vec![0u8; MAX_FRAME + 1]),
            Err(Reject::Malformed)
        );
        // A correctly tagged frame with another magic or version is not ours.
        for (at, val) in [(0, b'Y'), (5, 2)] {
            let mut inner = frame[LEN_PREFIX..].to_vec();
            inner[at] = val;
            let n = inner.len() - TAG_LEN;
            let mut mac = keyed(KEY);
            mac.update(&inner[..n]);
            let tag = mac.finalize().into_bytes();
            inner[n..].copy_from_slice(&tag);
            assert_eq!(authenticate(KEY, &inner), Err(Reject::Malformed));
        }
    }

    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(name: &str, content: &[u8], mode: u32) -> Self {
            let p =
                std::env::temp_dir().join(format!("xlb-key-test-{}-{name}", std::process::id()));
            fs::write(&p, content).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            TempFile(p)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }

    #[test]
    fn load_key_checks_mode_and_length() {
        let good = TempFile::new(
            "good",
            b"  c2VjcmV0IGtleSBvZiB0aGUgY2x1c3RlciwgMzIgYnl0ZXM=\n",
            0o600,
        );
        assert_eq!(
            load_key(&good.0).unwrap(),
            b"c2VjcmV0IGtleSBvZiB0aGUgY2x1c3RlciwgMzIgYnl0ZXM="
        );
        let ro = TempFile::new("ro", &[b'k'; 32], 0o400);
        assert_eq!(load_key(&ro.0).unwrap().len(), 32);

        let open = TempFile::new("open", &[b'k'; 40], 0o644);
        let err = format!("{:#}", load_key(&open.0).unwrap_err());
        assert!(
            err.contains("chmod 600") && err.contains(open.0.to_str().unwrap()),
            "{err}"
        );
        let group = TempFile::new("group", &[b'k'; 40], 0o620);
        assert!(load_key(&group.0).is_err());

        // 31 bytes once the whitespace is trimmed.
        let short = TempFile::new(
            "short",
            format!(" {}\n\n", "k".repeat(31)).as_bytes(),
            0o600,
        );
        let err = format!("{:#}", load_key(&short.0).unwrap_err());
        assert!(err.contains("head -c 32 /dev/urandom | base64"), "{err}");

        let missing =
            std::env::temp_dir().join(format!("xlb-key-test-{}-missing", std::process::id()));
        let err = format!("{:#}", load_key(&missing).unwrap_err());
        assert!(err.contains(missing.to_str().unwrap()), "{err}");
    }
}
