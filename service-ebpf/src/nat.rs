//! Address and port rewrites with checksums kept correct: by the kernel's
//! incremental checksum helpers (`bpf_l3_csum_replace`/`bpf_l4_csum_replace`)
//! on TC, by RFC 1624 incremental updates on XDP. One body per context for
//! both families ([`IpFamily`]): IPv4 also has its header checksum, IPv6
//! has none, so its L4 checksum (mandatory for UDP over IPv6) is all there
//! is to keep.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use service_common::PROTO_UDP;

use crate::{
    packet::{Flow, Fragment, IpFamily, Packet as _},
    wire::{IP_CSUM_OFF, L4_DPORT_OFF, L4_SPORT_OFF, csum_replace},
};

/// Which end of the flow a rewrite changes.
#[derive(Clone, Copy)]
pub enum Side {
    /// Source address and port (reverse NAT of replies, SNAT).
    Source,
    /// Destination address and port (DNAT to a backend).
    Destination,
}

/// Rewrites one side of a flow to `addr:port` (both network byte order)
/// and fixes the IP (IPv4) and L4 checksums. A UDP checksum of zero (none,
/// for IPv4; invalid for IPv6) stays zero. A later fragment holds no L4
/// header: only its address and IPv4 checksum change (its first fragment's
/// L4 checksum covers the whole datagram, ports included). Implemented with
/// the kernel's checksum helpers for TC (which also handle offloaded
/// checksums) and by hand for XDP.
pub trait Rewriter {
    /// Rewrites `side` of `flow` (as it was parsed) to `addr:port`.
    fn rewrite<A: IpFamily>(
        &self,
        flow: &Flow<A>,
        side: Side,
        addr: &A,
        port: u16,
    ) -> Result<(), i64>;
}

/// The old address and port of `side`, and the offsets of both fields.
#[inline(always)]
fn fields<A: IpFamily>(flow: &Flow<A>, side: Side) -> (&A, u16, usize, usize) {
    match side {
        Side::Source => (&flow.saddr, flow.sport, A::SRC_OFF, L4_SPORT_OFF),
        Side::Destination => (&flow.daddr, flow.dport, A::DST_OFF, L4_DPORT_OFF),
    }
}

/// Writes the address `addr` at `offset`: an IPv6 one as four 32-bit words
/// (written as sixteen bytes, the BPF target would load, spill and store
/// it byte by byte; every address the datapath writes sits 4-byte aligned:
/// `wire::csum_replace_addr6`), an IPv4 one as it always was.
#[inline(always)]
fn write_addr<P: crate::packet::Packet, A: IpFamily>(
    ctx: &P,
    offset: usize,
    addr: &A,
) -> Result<(), i64> {
    if !A::WIDE {
        return ctx.write(offset, addr);
    }
    let words = core::ptr::from_ref(addr).cast::<u32>();
    for index in 0..core::mem::size_of::<A>() / 4 {
        // SAFETY: a word inside the address; aligned (see above).
        let word = unsafe { words.add(index).read() };
        ctx.write(offset + index * 4, &word)?;
    }
    Ok(())
}

/// The L4 checksum flags of `flow` for `bpf_l4_csum_replace`: a UDP
/// checksum of zero stays zero, and none becomes zero.
#[inline(always)]
fn mangled_0<A>(flow: &Flow<A>) -> u64 {
    if flow.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// Updates the L4 checksum at `csum_off` for an address of the pseudo
/// header changed from `old` to `new` (`flags`: [`mangled_0`]): IPv4's four
/// bytes in one helper call, an IPv6 address as the difference
/// `bpf_csum_diff` computes, applied with a size of 0.
#[inline(always)]
fn l4_addr_csum<A: IpFamily>(
    ctx: &TcContext,
    csum_off: usize,
    old: &A,
    new: &A,
    flags: u64,
) -> Result<(), i64> {
    let size = core::mem::size_of::<A>();
    if size == 4 {
        // SAFETY: `A` is four bytes.
        let (old, new) = unsafe {
            (
                core::ptr::from_ref(old).cast::<u32>().read_unaligned(),
                core::ptr::from_ref(new).cast::<u32>().read_unaligned(),
            )
        };
        return ctx.l4_csum_replace(
            csum_off,
            u64::from(old),
            u64::from(new),
            u64::from(BPF_F_PSEUDO_HDR) | flags | 4,
        );
    }
    // SAFETY: the helper reads `size` bytes of each address.
    let diff = unsafe {
        bpf_csum_diff(
            core::ptr::from_ref(old).cast_mut().cast(),
            size as u32,
            core::ptr::from_ref(new).cast_mut().cast(),
            size as u32,
            0,
        )
    };
    if diff < 0 {
        return Err(diff);
    }
    ctx.l4_csum_replace(
        csum_off,
        0,
        diff as u64,
        u64::from(BPF_F_PSEUDO_HDR) | flags,
    )
}

impl Rewriter for TcContext {
    /// The L4 checksum goes through `bpf_l4_csum_replace` (the address as
    /// part of the pseudo header, the port as data), which knows the skb's
    /// checksum state: a checksum left to offload only gets the address
    /// change, as it must. The IPv4 header checksum is plain arithmetic, and
    /// the fields are written in place.
    #[inline(always)]
    fn rewrite<A: IpFamily>(
        &self,
        flow: &Flow<A>,
        side: Side,
        addr: &A,
        port: u16,
    ) -> Result<(), i64> {
        let (old_addr, old_port, addr_off, port_off) = fields(flow, side);
        let ip_csum: u16 = if A::HEADER_CHECKSUM {
            self.read(flow.l3_off + IP_CSUM_OFF).ok_or(-1i64)?
        } else {
            0
        };
        let whole = flow.fragment != Fragment::Later;
        if whole {
            let mangled_0 = mangled_0(flow);
            let csum_off = flow.l4_csum_off();
            if !old_addr.same(addr) {
                l4_addr_csum(self, csum_off, old_addr, addr, mangled_0)?;
            }
            if old_port != port {
                self.l4_csum_replace(
                    csum_off,
                    u64::from(old_port),
                    u64::from(port),
                    mangled_0 | 2,
                )?;
            }
        }
        if A::HEADER_CHECKSUM {
            self.write(
                flow.l3_off + IP_CSUM_OFF,
                &A::csum_replace_addr(ip_csum, old_addr, addr),
            )?;
        }
        write_addr(self, flow.l3_off + addr_off, addr)?;
        if whole {
            self.write(flow.l4_off + port_off, &port)?;
        }
        Ok(())
    }
}

impl Rewriter for XdpContext {
    #[inline(always)]
    fn rewrite<A: IpFamily>(
        &self,
        flow: &Flow<A>,
        side: Side,
        addr: &A,
        port: u16,
    ) -> Result<(), i64> {
        let (old_addr, old_port, addr_off, port_off) = fields(flow, side);
        if A::HEADER_CHECKSUM {
            let ip_csum: u16 = self.read(flow.l3_off + IP_CSUM_OFF).ok_or(-1i64)?;
            let ip_csum = A::csum_replace_addr(ip_csum, old_addr, addr);
            if flow.fragment == Fragment::Later {
                self.write(flow.l3_off + IP_CSUM_OFF, &ip_csum)?;
                return write_addr(self, flow.l3_off + addr_off, addr);
            }
            self.write(flow.l3_off + IP_CSUM_OFF, &ip_csum)?;
        } else if flow.fragment == Fragment::Later {
            return write_addr(self, flow.l3_off + addr_off, addr);
        }
        let csum_off = flow.l4_csum_off();
        let l4_csum: u16 = self.read(csum_off).ok_or(-1i64)?;
        // The L4 checksum covers the pseudo header (addresses) and the port.
        let mut l4 = csum_replace(
            A::csum_replace_addr(l4_csum, old_addr, addr),
            old_port,
            port,
        );
        if flow.proto == PROTO_UDP {
            // Zero means "no checksum" for UDP over IPv4 (and is invalid
            // over IPv6): keep it so, and never produce a zero from a real
            // one.
            l4 = if l4_csum == 0 {
                0
            } else if l4 == 0 {
                0xffff
            } else {
                l4
            };
        }
        self.write(csum_off, &l4)?;
        write_addr(self, flow.l3_off + addr_off, addr)?;
        self.write(flow.l4_off + port_off, &port)
    }
}
