//! Address and port rewrites with checksums kept correct: by the kernel's
//! incremental checksum helpers (`bpf_l3_csum_replace`/`bpf_l4_csum_replace`)
//! on TC, by RFC 1624 incremental updates on XDP.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use service_common::PROTO_UDP;

use crate::packet::{Ipv4Flow, Packet as _};

/// Offset of the source address inside the IPv4 header.
const IP_SRC_OFF: usize = 12;
/// Offset of the destination address inside the IPv4 header.
const IP_DST_OFF: usize = 16;
/// Offset of the header checksum inside the IPv4 header.
const IP_CSUM_OFF: usize = 10;

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// Source address and port (reverse NAT of replies, SNAT).
    Source,
    /// Destination address and port (DNAT to a backend).
    Destination,
}

/// Rewrites one side of an IPv4 flow to `addr:port` (both network byte
/// order) and fixes the IP and L4 checksums. A UDP checksum of zero (none)
/// stays zero. Implemented with the kernel's checksum helpers for TC (which
/// also handle offloaded checksums) and by hand for XDP.
pub trait Rewriter {
    /// Rewrites `side` of `flow` (as it was parsed) to `addr:port`.
    fn rewrite_v4(&self, flow: &Ipv4Flow, side: Side, addr: [u8; 4], port: u16) -> Result<(), i64>;
}

/// The old address and port of `side`, and the offsets of both fields.
#[inline(always)]
fn fields(flow: &Ipv4Flow, side: Side) -> ([u8; 4], u16, usize, usize) {
    match side {
        Side::Source => (flow.saddr, flow.sport, IP_SRC_OFF, 0),
        Side::Destination => (flow.daddr, flow.dport, IP_DST_OFF, 2),
    }
}

impl Rewriter for TcContext {
    #[inline(always)]
    fn rewrite_v4(&self, flow: &Ipv4Flow, side: Side, addr: [u8; 4], port: u16) -> Result<(), i64> {
        let (old_addr, old_port, addr_off, port_off) = fields(flow, side);
        let mangled_0 = if flow.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let csum_off = flow.l4_csum_off();
        let old_ip = u64::from(u32::from_ne_bytes(old_addr));
        let new_ip = u64::from(u32::from_ne_bytes(addr));
        if old_ip != new_ip {
            self.l4_csum_replace(
                csum_off,
                old_ip,
                new_ip,
                u64::from(BPF_F_PSEUDO_HDR) | mangled_0 | 4,
            )?;
            self.l3_csum_replace(flow.l3_off + IP_CSUM_OFF, old_ip, new_ip, 4)?;
            self.store(flow.l3_off + addr_off, &addr, 0)?;
        }
        if old_port != port {
            self.l4_csum_replace(
                csum_off,
                u64::from(old_port),
                u64::from(port),
                mangled_0 | 2,
            )?;
            self.store(flow.l4_off + port_off, &port, 0)?;
        }
        Ok(())
    }
}

impl Rewriter for XdpContext {
    #[inline(always)]
    fn rewrite_v4(&self, flow: &Ipv4Flow, side: Side, addr: [u8; 4], port: u16) -> Result<(), i64> {
        let (old_addr, old_port, addr_off, port_off) = fields(flow, side);
        let csum_off = flow.l4_csum_off();
        let ip_csum: u16 = self.read(flow.l3_off + IP_CSUM_OFF).ok_or(-1i64)?;
        let l4_csum: u16 = self.read(csum_off).ok_or(-1i64)?;
        let old = split(old_addr);
        let new = split(addr);
        let ip_csum = csum_replace(csum_replace(ip_csum, old[0], new[0]), old[1], new[1]);
        // The L4 checksum covers the pseudo header (addresses) and the port.
        let mut l4 = csum_replace(csum_replace(l4_csum, old[0], new[0]), old[1], new[1]);
        l4 = csum_replace(l4, old_port, port);
        if flow.proto == PROTO_UDP {
            // Zero means "no checksum" for UDP over IPv4: keep it so, and
            // never produce a zero from a real one.
            l4 = if l4_csum == 0 {
                0
            } else if l4 == 0 {
                0xffff
            } else {
                l4
            };
        }
        self.write(flow.l3_off + IP_CSUM_OFF, &ip_csum)?;
        self.write(csum_off, &l4)?;
        self.write(flow.l3_off + addr_off, &addr)?;
        self.write(flow.l4_off + port_off, &port)
    }
}

/// An address as two 16-bit words in wire order (as native u16s).
#[inline(always)]
fn split(addr: [u8; 4]) -> [u16; 2] {
    [
        u16::from_ne_bytes([addr[0], addr[1]]),
        u16::from_ne_bytes([addr[2], addr[3]]),
    ]
}

/// Incremental checksum update (RFC 1624, eqn. 3): the checksum `csum`
/// after one 16-bit word changes from `old` to `new`. All values are wire
/// bytes read as native u16s; the one's complement sum does not depend on
/// byte order as long as it is the same for all.
#[inline(always)]
pub fn csum_replace(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
