//! Address and port rewrites with checksums kept correct: by the kernel's
//! incremental checksum helpers (`bpf_l3_csum_replace`/`bpf_l4_csum_replace`)
//! on TC, by RFC 1624 incremental updates on XDP.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use service_common::PROTO_UDP;

use crate::{
    packet::{Fragment, Ipv4Flow, Packet as _},
    wire::{
        IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DPORT_OFF, L4_SPORT_OFF, csum_replace,
        csum_replace_addr,
    },
};

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
/// stays zero. A later fragment holds no L4 header: only its address and
/// IPv4 checksum change (its first fragment's L4 checksum covers the whole
/// datagram, ports included). Implemented with the kernel's checksum
/// helpers for TC (which also handle offloaded checksums) and by hand for
/// XDP.
pub trait Rewriter {
    /// Rewrites `side` of `flow` (as it was parsed) to `addr:port`.
    fn rewrite_v4(&self, flow: &Ipv4Flow, side: Side, addr: [u8; 4], port: u16) -> Result<(), i64>;
}

/// The old address and port of `side`, and the offsets of both fields.
#[inline(always)]
fn fields(flow: &Ipv4Flow, side: Side) -> ([u8; 4], u16, usize, usize) {
    match side {
        Side::Source => (flow.saddr, flow.sport, IP_SRC_OFF, L4_SPORT_OFF),
        Side::Destination => (flow.daddr, flow.dport, IP_DST_OFF, L4_DPORT_OFF),
    }
}

impl Rewriter for TcContext {
    #[inline(always)]
    fn rewrite_v4(&self, flow: &Ipv4Flow, side: Side, addr: [u8; 4], port: u16) -> Result<(), i64> {
        let (old_addr, old_port, addr_off, port_off) = fields(flow, side);
        if flow.fragment == Fragment::Later {
            let old_ip = u64::from(u32::from_ne_bytes(old_addr));
            let new_ip = u64::from(u32::from_ne_bytes(addr));
            self.l3_csum_replace(flow.l3_off + IP_CSUM_OFF, old_ip, new_ip, 4)?;
            return self.store(flow.l3_off + addr_off, &addr, 0);
        }
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
        let ip_csum: u16 = self.read(flow.l3_off + IP_CSUM_OFF).ok_or(-1i64)?;
        let ip_csum = csum_replace_addr(ip_csum, old_addr, addr);
        if flow.fragment == Fragment::Later {
            self.write(flow.l3_off + IP_CSUM_OFF, &ip_csum)?;
            return self.write(flow.l3_off + addr_off, &addr);
        }
        let csum_off = flow.l4_csum_off();
        let l4_csum: u16 = self.read(csum_off).ok_or(-1i64)?;
        // The L4 checksum covers the pseudo header (addresses) and the port.
        let mut l4 = csum_replace(csum_replace_addr(l4_csum, old_addr, addr), old_port, port);
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
