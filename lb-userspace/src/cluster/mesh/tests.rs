//! Meshes on ephemeral 127.0.0.1 ports, and raw clients playing a forged, replaying or confused peer.

use super::*;
use std::net::TcpListener as StdListener;
use tokio::io::AsyncWriteExt;

const KEY: &[u8] = b"test cluster key, 32 bytes long!";
const WAIT: Duration = Duration::from_secs(10);

fn bind() -> StdListener {
    StdListener::bind("127.0.0.1:0").expect("bind loopback")
}

fn config(node_id: u32, listen: SocketAddr, peers: &[(u32, SocketAddr)]) -> MeshConfig {
    MeshConfig {
        node_id,
        listen,
        peers: peers.iter().copied().collect(),
        key: Arc::from(KEY),
        window: Duration::from_secs(30),
    }
}

/// The next event matching `want`, skipping others; panics after `WAIT`.
async fn wait_for(
    rx: &mut mpsc::Receiver<Event>,
    what: &str,
    want: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) if want(&ev) => return ev,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event channel closed while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// Fails if a Message arrives within `quiet`.
async fn no_message(rx: &mut mpsc::Receiver<Event>, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        assert!(!matches!(ev, Event::Message { .. }), "unexpected {ev:?}");
    }
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peer(stats: &MeshStats, id: u32) -> PeerStats {
    stats
        .peers
        .iter()
        .find(|p| p.id == id)
        .cloned()
        .expect("peer in stats")
}

/// Expects the server to close `s` within `WAIT` (EOF or reset), having written nothing.
async fn closed_by_server(s: &mut TcpStream) {
    let mut b = [0u8; 16];
    match tokio::time::timeout(WAIT, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("server wrote {n} bytes on an inbound connection"),
        Err(_) => panic!("server kept the connection open"),
    }
}

// The daemon runs a multi-threaded runtime; the other tests run on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_exchange_and_broadcast() {
    let ls = [bind(), bind(), bind()];
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut nodes = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        let id = i as u32 + 1;
        let peers: Vec<(u32, SocketAddr)> = (0..3)
            .filter(|&j| j != i)
            .map(|j| (j as u32 + 1, addrs[j]))
            .collect();
        nodes.push(
            start_with_listener(config(id, addrs[i], &peers), l)
                .await
                .unwrap(),
        );
    }
    for (i, (_, rx)) in nodes.iter_mut().enumerate() {
        // Links come up in any order.
        let mut up = std::collections::BTreeSet::new();
        while up.len() < 2 {
            if let Event::Connected(p) =
                wait_for(rx, "Connected", |e| matches!(e, Event::Connected(_))).await
            {
                assert_ne!(p, i as u32 + 1);
                up.insert(p);
            }
        }
    }
    // Every ordered pair, both ways.
    for from in 1..=3u32 {
        for to in (1..=3).filter(|&t| t != from) {
            let body = Bytes::from(format!("{from}->{to}"));
            nodes[from as usize - 1].0.send(to, body.clone()).unwrap();
            let got = wait_for(&mut nodes[to as usize - 1].1, "Message", |e| {
                matches!(e, Event::Message { .. })
            })
            .await;
            assert_eq!(got, Event::Message { from, body });
        }
    }
    nodes[1].0.broadcast(Bytes::from_static(b"from two to all"));
    for to in [1usize, 3] {
        let got = wait_for(&mut nodes[to - 1].1, "broadcast", |e| {
            matches!(e, Event::Message { .. })
        })
        .await;
        assert_eq!(
            got,
            Event::Message {
                from: 2,
                body: Bytes::from_static(b"from two to all")
            }
        );
    }
    // Many frames in one burst arrive complete and in order.
    for n in 0..500u32 {
        nodes[0]
            .0
            .send(3, Bytes::from(n.to_be_bytes().to_vec()))
            .unwrap();
    }
    for n in 0..500u32 {
        let got = wait_for(&mut nodes[2].1, "burst", |e| {
            matches!(e, Event::Message { .. })
        })
        .await;
        assert_eq!(
            got,
            Event::Message {
                from: 1,
                body: Bytes::from(n.to_be_bytes().to_vec())
            }
        );
    }
    assert_eq!(
        nodes[0].0.send(9, Bytes::from_static(b"x")),
        Err(SendError::UnknownPeer)
    );

    let s1 = nodes[0].0.stats();
    let to3 = peer(&s1, 3);
    assert!(to3.out_connected);
    assert!(to3.frames_tx >= 501, "{to3:?}");
    let s3 = nodes[2].0.stats();
    let from1 = peer(&s3, 1);
    assert_eq!(from1.in_connections, 1);
    assert!(
        from1.frames_rx >= 501 && from1.last_rx_unix_ms.is_some(),
        "{from1:?}"
    );
    assert_eq!(
        (s3.rejected_auth, s3.rejected_replay, s3.rejected_other),
        (0, 0, 0)
    );

    for (h, _) in &nodes {
        h.shutdown();
    }
    for (h, _) in &nodes {
        tokio::time::timeout(WAIT, h.closed())
            .await
            .expect("mesh tasks end after shutdown");
    }
    assert_eq!(
        nodes[0].0.send(2, Bytes::from_static(b"x")),
        Err(SendError::NotConnected)
    );
}

#[tokio::test]
async fn restarted_peer_is_reconnected_and_accepted() {
    let (la, lb) = (bind(), bind());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let (a, mut a_rx) = start_with_listener(config(1, a_addr, &[(2, b_addr)]), la)
        .await
        .unwrap();
    let (b, mut b_rx) = start_with_listener(config(2, b_addr, &[(1, a_addr)]), lb)
        .await
        .unwrap();
    wait_for(&mut a_rx, "A→B up", |e| *e == Event::Connected(2)).await;
    wait_for(&mut b_rx, "B→A up", |e| *e == Event::Connected(1)).await;
    for n in 0..50u8 {
        b.send(1, Bytes::from(vec![n])).unwrap();
    }
    for _ in 0..50 {
        wait_for(&mut a_rx, "old B's message", |e| {
            matches!(e, Event::Message { .. })
        })
        .await;
    }

    b.shutdown();
    tokio::time::timeout(WAIT, b.closed())
        .await
        .expect("B's tasks end");
    wait_for(&mut a_rx, "A→B down", |e| *e == Event::Disconnected(2)).await;
    assert_eq!(
        a.send(2, Bytes::from_static(b"lost")),
        Err(SendError::NotConnected)
    );

    // The restarted B binds the same address again and has a larger incarnation, so its seq 1 is new.
    let (b2, mut b2_rx) = start(config(2, b_addr, &[(1, a_addr)]))
        .await
        .expect("restart B on its address");
    wait_for(&mut a_rx, "A→B up again", |e| *e == Event::Connected(2)).await;
    wait_for(&mut b2_rx, "new B→A up", |e| *e == Event::Connected(1)).await;
    b2.send(1, Bytes::from_static(b"new B")).unwrap();
    let got = wait_for(&mut a_rx, "new B's message", |e| {
        matches!(e, Event::Message { .. })
    })
    .await;
    assert_eq!(
        got,
        Event::Message {
            from: 2,
            body: Bytes::from_static(b"new B")
        }
    );
    a.send(2, Bytes::from_static(b"hello new B")).unwrap();
    let got = wait_for(&mut b2_rx, "A's message", |e| {
        matches!(e, Event::Message { .. })
    })
    .await;
    assert_eq!(
        got,
        Event::Message {
            from: 1,
            body: Bytes::from_static(b"hello new B")
        }
    );

    let sa = a.stats();
    assert_eq!(sa.rejected_replay, 0);
    assert_eq!(peer(&sa, 2).reconnects, 1);
    a.shutdown();
    b2.shutdown();
}

#[tokio::test]
async fn queue_overflow_drops_queue_and_redials() {
    let (la, lb) = (bind(), bind());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let (a, mut a_rx) = start_with_listener(config(1, a_addr, &[(2, b_addr)]), la)
        .await
        .unwrap();
    let (b, _b_rx) = start_with_listener(config(2, b_addr, &[(1, a_addr)]), lb)
        .await
        .unwrap();
    wait_for(&mut a_rx, "A→B up", |e| *e == Event::Connected(2)).await;
    // No await between sends: the writer cannot drain, so the 4097th overflows.
    for n in 0..QUEUE_FRAMES {
        assert_eq!(a.send(2, Bytes::from_static(b"x")), Ok(()), "frame {n}");
    }
    assert_eq!(
        a.send(2, Bytes::from_static(b"x")),
        Err(SendError::Overflow)
    );
    assert_eq!(
        a.send(2, Bytes::from_static(b"x")),
        Err(SendError::Overflow)
    );
    wait_for(&mut a_rx, "link reset", |e| *e == Event::Disconnected(2)).await;
    wait_for(&mut a_rx, "redialed", |e| *e == Event::Connected(2)).await;
    let p = peer(&a.stats(), 2);
    assert_eq!((p.overflows, p.reconnects), (1, 1));
    assert_eq!(a.send(2, Bytes::from_static(b"x")), Ok(()));
    a.shutdown();
    b.shutdown();
}

/// A mesh for node 1 whose only peer (2) has nowhere to dial: tests play node 2 with raw sockets.
async fn lone_node() -> (MeshHandle, mpsc::Receiver<Event>, SocketAddr) {
    let l = bind();
    let addr = l.local_addr().unwrap();
    // A port that was just free: dialing it is refused, which is all node 1 needs.
    let nowhere = bind().local_addr().unwrap();
    let (h, rx) = start_with_listener(config(1, addr, &[(2, nowhere)]), l)
        .await
        .unwrap();
    (h, rx, addr)
}

fn frame(key: &[u8], sender: u32, receiver: u32, body: &[u8]) -> Vec<u8> {
    Sealer::new(key, sender, new_incarnation()).seal(receiver, body, unix_ms())
}

#[tokio::test]
async fn wrong_key_is_rejected_and_closed() {
    let (h, mut rx, addr) = lone_node().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&frame(b"not the cluster key, but 32 long", 2, 1, b"forged"))
        .await
        .unwrap();
    closed_by_server(&mut s).await;
    assert_eq!(h.stats().rejected_auth, 1);
    no_message(&mut rx, Duration::from_millis(200)).await;
    h.shutdown();
}

#[tokio::test]
async fn replayed_frame_on_a_new_connection_is_dropped() {
    let (h, mut rx, addr) = lone_node().await;
    let captured = frame(KEY, 2, 1, b"state");
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(&captured).await.unwrap();
    let got = wait_for(&mut rx, "Message", |e| matches!(e, Event::Message { .. })).await;
    assert_eq!(
        got,
        Event::Message {
            from: 2,
            body: Bytes::from_static(b"state")
        }
    );
    assert_eq!(peer(&h.stats(), 2).in_connections, 1);

    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(&captured).await.unwrap();
    until("rejected_replay", || h.stats().rejected_replay == 1).await;
    no_message(&mut rx, Duration::from_millis(200)).await;
    // A replay is dropped, the connection kept.
    let mut b = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), second.read(&mut b))
            .await
            .is_err()
    );
    assert_eq!(peer(&h.stats(), 2).in_connections, 2);
    drop((first, second));
    until("in_connections back to 0", || {
        peer(&h.stats(), 2).in_connections == 0
    })
    .await;
    h.shutdown();
}

#[tokio::test]
async fn misdirected_frame_and_unknown_sender_are_dropped() {
    let (h, mut rx, addr) = lone_node().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&frame(KEY, 2, 3, b"for node 3")).await.unwrap();
    s.write_all(&frame(KEY, 7, 1, b"from a stranger"))
        .await
        .unwrap();
    until("rejected_other", || h.stats().rejected_other == 2).await;
    no_message(&mut rx, Duration::from_millis(200)).await;
    // Still open: a valid frame on it is delivered.
    s.write_all(&frame(KEY, 2, 1, b"ok")).await.unwrap();
    let got = wait_for(&mut rx, "Message", |e| matches!(e, Event::Message { .. })).await;
    assert_eq!(
        got,
        Event::Message {
            from: 2,
            body: Bytes::from_static(b"ok")
        }
    );
    h.shutdown();
}

#[tokio::test]
async fn oversize_or_garbage_length_closes_the_connection() {
    let (h, _rx, addr) = lone_node().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&(wire::MAX_FRAME as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    closed_by_server(&mut s).await;
    assert_eq!(h.stats().rejected_other, 1);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    closed_by_server(&mut s).await;
    assert_eq!(h.stats().rejected_other, 2);
    h.shutdown();
}

#[tokio::test]
async fn connections_over_the_limit_are_refused() {
    let (h, _rx, addr) = lone_node().await;
    // One peer: 4 × 1 + 4 = 8 connections are allowed.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut extra = TcpStream::connect(addr).await.unwrap();
    closed_by_server(&mut extra).await;
    assert_eq!(h.stats().connections_refused, 1);
    h.shutdown();
}

#[tokio::test]
async fn slow_consumer_loses_nothing_and_large_bodies_pass() {
    let (la, lb) = (bind(), bind());
    let (a_addr, b_addr) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let (a, mut a_rx) = start_with_listener(config(1, a_addr, &[(2, b_addr)]), la)
        .await
        .unwrap();
    let (b, mut b_rx) = start_with_listener(config(2, b_addr, &[(1, a_addr)]), lb)
        .await
        .unwrap();
    wait_for(&mut a_rx, "A→B up", |e| *e == Event::Connected(2)).await;
    // More than the event channel holds, while B's consumer is not reading.
    let n = 3 * EVENT_QUEUE as u32;
    for i in 0..n {
        a.send(2, Bytes::from(i.to_be_bytes().to_vec())).unwrap();
    }
    // Above the size that is HMAC-checked on the blocking pool.
    let big = Bytes::from(
        (0..2 * 1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    a.send(2, big.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..n {
        let got = wait_for(&mut b_rx, "Message", |e| matches!(e, Event::Message { .. })).await;
        assert_eq!(
            got,
            Event::Message {
                from: 1,
                body: Bytes::from(i.to_be_bytes().to_vec())
            }
        );
    }
    let got = wait_for(&mut b_rx, "big Message", |e| {
        matches!(e, Event::Message { .. })
    })
    .await;
    assert_eq!(got, Event::Message { from: 1, body: big });
    let too_big = Bytes::from(vec![0u8; wire::MAX_BODY + 1]);
    assert_eq!(a.send(2, too_big), Err(SendError::TooLarge));
    assert_eq!(b.stats().rejected_replay + b.stats().rejected_other, 0);
    a.shutdown();
    b.shutdown();
}

#[tokio::test]
async fn peer_that_stops_reading_is_disconnected() {
    let la = bind();
    let a_addr = la.local_addr().unwrap();
    // "Node 2" accepts A's link and never reads it.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, mut a_rx) =
        start_with_listener(config(1, a_addr, &[(2, sink.local_addr().unwrap())]), la)
            .await
            .unwrap();
    let (_held, _) = tokio::time::timeout(WAIT, sink.accept())
        .await
        .unwrap()
        .unwrap();
    wait_for(&mut a_rx, "A→2 up", |e| *e == Event::Connected(2)).await;
    // Far more than loopback socket buffers hold, far less than the queue limit.
    let mb = Bytes::from(vec![7u8; 1024 * 1024]);
    for _ in 0..48 {
        a.send(2, mb.clone()).unwrap();
    }
    let t = Instant::now();
    wait_for(&mut a_rx, "write timeout", |e| *e == Event::Disconnected(2)).await;
    assert!(
        t.elapsed() >= WRITE_TIMEOUT - Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // And it redials.
    let (_again, _) = tokio::time::timeout(WAIT, sink.accept())
        .await
        .unwrap()
        .unwrap();
    wait_for(&mut a_rx, "A→2 up again", |e| *e == Event::Connected(2)).await;
    a.shutdown();
}
