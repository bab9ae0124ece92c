//! Fixture tests of the IP-in-IP decapsulator (`xlb decap`): the real
//! program in the real kernel through BPF_PROG_TEST_RUN, loaded and given
//! its VIPs through the same userspace code `xlb decap` uses
//! (`Decapsulator::load` + `decap::set_vips`). Each checks the verdict
//! (always XDP_PASS), the output frame's bytes and the counter it moved.
//!
//! Needs root (loading BPF programs); run by `cargo xtask test`.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::decap::stat;
use xlb::decap::{self, Decapsulator, VipChange};
use xlb_tests::frames::{Encap, Frame, ip};

const XDP_PASS: u32 = 2;

const VIP4: &str = "10.0.0.10";
const VIP6: &str = "fd00::10";
/// Outer addresses: the load balancer and the backend.
const LB4: &str = "192.168.1.1";
const BE4: &str = "192.168.2.2";
const LB6: &str = "fd01::1";
const BE6: &str = "fd02::2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loaded (unattached) decapsulator with its own pin directory, removed on drop.
struct Fixture {
    dc: Decapsulator,
    dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("fixture tests load BPF programs and need root: run `cargo xtask test` as root");
        }
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/xlb-decap-fixture-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let dc = Decapsulator::load(&dir).expect("loading the xlb-decap program");
        let fx = Self { dc, dir };
        fx.set_vips(&[VIP4, VIP6]);
        fx
    }

    fn set_vips(&self, vips: &[&str]) -> VipChange {
        let vips: Vec<IpAddr> = vips.iter().map(|v| ip(v)).collect();
        decap::set_vips(&self.dir, &vips).expect("writing the VIPs")
    }

    /// Runs one frame; asserts XDP_PASS and returns the output frame.
    fn run(&mut self, frame: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dc.program_mut().expect("xlb_decap program");
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            result.return_value, XDP_PASS,
            "the decapsulator only passes"
        );
        out.truncate(result.data_size_out as usize);
        out
    }

    /// Runs one frame; asserts that exactly the counter `reason` moved, by one.
    fn run_counted(&mut self, frame: &[u8], reason: u32) -> Vec<u8> {
        let before = self.counters();
        let out = self.run(frame);
        let after = self.counters();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let want = if i == reason as usize { b + 1 } else { *b };
            assert_eq!(
                *a,
                want,
                "counter {} (frame should count as {})",
                stat::NAMES[i],
                stat::NAMES[reason as usize]
            );
        }
        out
    }

    fn counters(&self) -> Vec<u64> {
        decap::stats(&self.dir)
            .expect("reading counters")
            .counters
            .iter()
            .map(|(_, v)| *v)
            .collect()
    }

    /// Asserts the frame is decapsulated to exactly `Encap::decapsulated`.
    fn assert_decap(&mut self, e: &Encap, reason: u32) {
        let input = e.build();
        let out = self.run_counted(&input, reason);
        let want = e.decapsulated();
        assert_eq!(
            out,
            want,
            "decapsulated frame (in {} bytes, out {}, want {})",
            input.len(),
            out.len(),
            want.len()
        );
        assert_eq!(
            input.len() - out.len(),
            e.outer_header().len(),
            "exactly the outer header goes"
        );
    }

    /// Asserts the frame passes byte for byte unchanged, counted as `reason`.
    fn assert_untouched(&mut self, input: &[u8], reason: u32) {
        let out = self.run_counted(input, reason);
        assert_eq!(out, input, "frame must pass untouched");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn udp4() -> Frame {
    Frame::udp("10.9.0.50", VIP4, 53)
}

fn tcp6() -> Frame {
    Frame::tcp("fd09::50", VIP6, 80)
}

#[test]
fn ipv4_in_ipv4() {
    let mut fx = Fixture::new();
    fx.assert_decap(&Encap::new(LB4, BE4, udp4()), stat::DECAP_4IN4);
    fx.assert_decap(
        &Encap::new(LB4, BE4, Frame::tcp("10.9.0.51", VIP4, 443)),
        stat::DECAP_4IN4,
    );
}

#[test]
fn ipv6_in_ipv6() {
    let mut fx = Fixture::new();
    fx.assert_decap(&Encap::new(LB6, BE6, tcp6()), stat::DECAP_6IN6);
    fx.assert_decap(
        &Encap::new(LB6, BE6, Frame::udp("fd09::51", VIP6, 53)),
        stat::DECAP_6IN6,
    );
}

#[test]
fn cross_families() {
    let mut fx = Fixture::new();
    fx.assert_decap(&Encap::new(LB4, BE4, tcp6()), stat::DECAP_6IN4);
    fx.assert_decap(&Encap::new(LB6, BE6, udp4()), stat::DECAP_4IN6);
}

#[test]
fn outer_ipv4_options_are_stripped_with_the_header() {
    let mut fx = Fixture::new();
    for words in [1usize, 4, 10] {
        let mut e = Encap::new(LB4, BE4, udp4());
        // NOPs, ending in End of Options: any content, the IHL says how long.
        e.ip_options = vec![1; words * 4];
        e.ip_options[words * 4 - 1] = 0;
        assert_eq!(e.outer_header().len(), 20 + words * 4);
        fx.assert_decap(&e, stat::DECAP_4IN4);
    }
}

#[test]
fn vlan_tag_is_kept() {
    let mut fx = Fixture::new();
    for (mut e, reason) in [
        (Encap::new(LB4, BE4, udp4()), stat::DECAP_4IN4),
        (Encap::new(LB6, BE6, tcp6()), stat::DECAP_6IN6),
        (Encap::new(LB6, BE6, udp4()), stat::DECAP_4IN6),
    ] {
        e.vlan = Some(0x2064);
        e.ip_options = if e.src.is_ipv4() { vec![1; 8] } else { vec![] };
        fx.assert_decap(&e, reason);
        let out = e.decapsulated();
        assert_eq!(&out[12..16], &[0x81, 0x00, 0x20, 0x64], "tag kept");
    }
}

#[test]
fn inner_packet_is_byte_identical_whatever_it_holds() {
    let mut fx = Fixture::new();
    // Real checksums, a payload, a fragment: none of it is the decapsulator's business.
    let mut inner = udp4();
    inner.payload = (0..=255u8).collect();
    inner.frags = 0x2000;
    let mut e = Encap::new(LB4, BE4, inner);
    e.inner_checksums = true;
    e.ttl = 1;
    e.tos = 0xb8;
    fx.assert_decap(&e, stat::DECAP_4IN4);
    let mut inner = tcp6();
    inner.v6_fragment = Some(0);
    let e = Encap::new(LB6, BE6, inner);
    fx.assert_decap(&e, stat::DECAP_6IN6);
}

#[test]
fn ethernet_padding_stays_behind_the_inner_packet() {
    let mut fx = Fixture::new();
    let e = Encap::new(LB4, BE4, udp4());
    let mut input = e.build();
    input.extend([0u8; 6]);
    let out = fx.run_counted(&input, stat::DECAP_4IN4);
    let mut want = e.decapsulated();
    want.extend([0u8; 6]);
    assert_eq!(out, want);
}

#[test]
fn not_a_vip_passes_untouched() {
    let mut fx = Fixture::new();
    for e in [
        Encap::new(LB4, BE4, Frame::udp("10.9.0.50", "10.0.0.11", 53)),
        Encap::new(LB6, BE6, Frame::tcp("fd09::50", "fd00::11", 80)),
        // The outer destination is no VIP's business: only the inner one counts.
        Encap::new(LB4, VIP4, Frame::udp("10.9.0.50", "10.0.0.11", 53)),
        // The VIP as the inner source.
        Encap::new(LB4, BE4, Frame::udp(VIP4, "10.0.0.11", 53)),
    ] {
        fx.assert_untouched(&e.build(), stat::PASS_NOT_VIP);
    }
}

#[test]
fn vip_set_is_replaced() {
    let mut fx = Fixture::new();
    let change = fx.set_vips(&[VIP6, "10.0.0.11"]);
    assert_eq!(change.added, vec![ip("10.0.0.11")]);
    assert_eq!(change.removed, vec![ip(VIP4)]);
    assert_eq!(change.kept, vec![ip(VIP6)]);
    assert_eq!(
        decap::read_vips(&fx.dir).expect("vips"),
        vec![ip("10.0.0.11"), ip(VIP6)]
    );
    fx.assert_untouched(&Encap::new(LB4, BE4, udp4()).build(), stat::PASS_NOT_VIP);
    fx.assert_decap(
        &Encap::new(LB4, BE4, Frame::udp("10.9.0.50", "10.0.0.11", 53)),
        stat::DECAP_4IN4,
    );
    fx.assert_decap(&Encap::new(LB6, BE6, tcp6()), stat::DECAP_6IN6);
}

#[test]
fn other_traffic_passes_untouched() {
    let mut fx = Fixture::new();
    // Plain traffic to the VIP and to the host.
    fx.assert_untouched(&udp4().build(), stat::PASS_NOT_IPIP);
    fx.assert_untouched(&tcp6().build(), stat::PASS_NOT_IPIP);
    let mut tagged = Frame::tcp("10.9.0.50", BE4, 22);
    tagged.vlan = Some(5);
    fx.assert_untouched(&tagged.build(), stat::PASS_NOT_IPIP);
    // GRE (47) from the load balancer is not IP-in-IP.
    let mut gre = Encap::new(LB4, BE4, udp4()).build();
    gre[14 + 9] = 47;
    fix_ipv4_checksum(&mut gre, 14);
    fx.assert_untouched(&gre, stat::PASS_NOT_IPIP);
    // ARP.
    let mut arp = vec![0xffu8; 6];
    arp.extend([0x02, 0, 0, 0, 0xcc, 0x01, 0x08, 0x06]);
    arp.extend([0u8; 28]);
    fx.assert_untouched(&arp, stat::PASS_NOT_IP);
}

#[test]
fn truncated_frames_pass_untouched() {
    let mut fx = Fixture::new();
    let mut tagged = Encap::new(LB4, BE4, udp4());
    tagged.vlan = Some(9);
    let cases = [
        (Encap::new(LB4, BE4, udp4()).build(), 14),
        (tagged.build(), 18),
        (Encap::new(LB6, BE6, tcp6()).build(), 14),
    ];
    for (full, l3) in cases {
        let v4 = full[l3] >> 4 == 4;
        let outer = if v4 { 20 } else { 40 };
        let inner = if full[l3 + outer] >> 4 == 4 { 20 } else { 40 };
        // Inside the VLAN tag (tagged frames only), the outer header, the inner header.
        let mut cuts = vec![
            l3 + 1,
            l3 + outer - 1,
            l3 + outer + 1,
            l3 + outer + inner - 1,
        ];
        if l3 == 18 {
            cuts.push(15);
        }
        for cut in cuts {
            let frame = &full[..cut];
            let out = fx.run(frame);
            assert_eq!(out, frame, "cut at {cut} must pass untouched");
        }
        // Every cut counts as malformed, and nothing was decapsulated.
        let c = fx.counters();
        assert_eq!(
            c[stat::DECAP_4IN4 as usize] + c[stat::DECAP_6IN6 as usize],
            0
        );
    }
    let c = fx.counters();
    assert_eq!(c[stat::PASS_MALFORMED as usize], 4 + 5 + 4);
    // The outer length claims more than the frame holds / less than the inner header.
    let mut long = Encap::new(LB4, BE4, udp4()).build();
    long[16..18].copy_from_slice(&2000u16.to_be_bytes());
    fix_ipv4_checksum(&mut long, 14);
    fx.assert_untouched(&long, stat::PASS_MALFORMED);
    let mut short = Encap::new(LB4, BE4, udp4()).build();
    short[16..18].copy_from_slice(&30u16.to_be_bytes());
    fix_ipv4_checksum(&mut short, 14);
    fx.assert_untouched(&short, stat::PASS_MALFORMED);
    let mut short6 = Encap::new(LB6, BE6, tcp6()).build();
    short6[18..20].copy_from_slice(&39u16.to_be_bytes());
    fx.assert_untouched(&short6, stat::PASS_MALFORMED);
    let mut long6 = Encap::new(LB6, BE6, tcp6()).build();
    long6[18..20].copy_from_slice(&2000u16.to_be_bytes());
    fx.assert_untouched(&long6, stat::PASS_MALFORMED);
}

#[test]
fn malformed_headers_pass_untouched() {
    let mut fx = Fixture::new();
    // Outer IHL below 5.
    let mut f = Encap::new(LB4, BE4, udp4()).build();
    f[14] = 0x44;
    fx.assert_untouched(&f, stat::PASS_MALFORMED);
    // Outer version disagrees with the EtherType.
    let mut f = Encap::new(LB4, BE4, udp4()).build();
    f[14] = 0x65;
    fx.assert_untouched(&f, stat::PASS_MALFORMED);
    let mut f = Encap::new(LB6, BE6, tcp6()).build();
    f[14] = 0x40;
    fx.assert_untouched(&f, stat::PASS_MALFORMED);
    // Inner version disagrees with the outer protocol (IPv6 behind protocol 4).
    let mut f = Encap::new(LB4, BE4, tcp6()).build();
    f[14 + 9] = 4;
    fix_ipv4_checksum(&mut f, 14);
    fx.assert_untouched(&f, stat::PASS_MALFORMED);
    // Inner IPv4 IHL below 5.
    let mut f = Encap::new(LB4, BE4, udp4()).build();
    f[34] = 0x43;
    fx.assert_untouched(&f, stat::PASS_MALFORMED);
    // Outer IPv4 header checksum wrong, with and without options.
    let mut f = Encap::new(LB4, BE4, udp4()).build();
    f[24] ^= 0x01;
    fx.assert_untouched(&f, stat::PASS_BAD_CHECKSUM);
    let mut e = Encap::new(LB4, BE4, udp4());
    e.ip_options = vec![1; 12];
    let mut f = e.build();
    f[14 + 20 + 5] ^= 0x80;
    fx.assert_untouched(&f, stat::PASS_BAD_CHECKSUM);
}

#[test]
fn outer_fragments_and_extension_headers_pass_untouched() {
    let mut fx = Fixture::new();
    for frags in [0x2000u16, 0x0001, 0x2010] {
        let mut e = Encap::new(LB4, BE4, udp4());
        e.frags = frags;
        fx.assert_untouched(&e.build(), stat::PASS_OUTER_FRAGMENT);
    }
    // DF alone is no fragment.
    let mut e = Encap::new(LB4, BE4, udp4());
    e.frags = 0x4000;
    fx.assert_decap(&e, stat::DECAP_4IN4);
    let mut f = Encap::new(LB6, BE6, tcp6()).build();
    f[14 + 6] = 44;
    fx.assert_untouched(&f, stat::PASS_OUTER_FRAGMENT);
    for ext in [0u8, 43, 60] {
        let mut f = Encap::new(LB6, BE6, tcp6()).build();
        f[14 + 6] = ext;
        fx.assert_untouched(&f, stat::PASS_V6_EXT_HEADER);
    }
}

#[test]
fn a_decapsulated_frame_is_not_decapsulated_again() {
    // BPF_PROG_TEST_RUN with repeat hands each run the previous run's
    // output: after the first, the program sees the plain inner packet.
    let mut fx = Fixture::new();
    let e = Encap::new(LB4, BE4, udp4());
    let input = e.build();
    let before = fx.counters();
    let mut out = vec![0u8; input.len() + 256];
    let prog = fx.dc.program_mut().expect("program");
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut out),
            repeat: 10,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    assert_eq!(out, e.decapsulated());
    let after = fx.counters();
    let moved = |i: u32| after[i as usize] - before[i as usize];
    assert_eq!(moved(stat::DECAP_4IN4), 1);
    assert_eq!(moved(stat::PASS_NOT_IPIP), 9);
}

/// Recomputes the IPv4 header checksum of the header at `l3` after an edit.
fn fix_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let len = usize::from(frame[l3] & 0x0f) * 4;
    frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let sum = xlb_tests::frames::checksum(&[&frame[l3..l3 + len]]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}
