//! `net-ping`: ARP and ICMP echo to the host side of the first virtio-net NIC.
//!
//! Sends `net.count=N` echo requests (default 5) to `net.peer` and reports each round trip
//! in microseconds, then the minimum, average and maximum. Passes if every request got its
//! reply. While it waits it also answers the host's pings (smoltcp does).

#![no_std]
#![no_main]

use smoltcp::iface::SocketHandle;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::icmp;
use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpAddress};
use core::sync::atomic::Ordering;
use splitvisor_guest_kit::virtio_net::{NET_INTERRUPTS, TIMER_INTERRUPTS};
use splitvisor_guest_kit::netstack::{Stack, buffer, slots};
use splitvisor_guest_kit::{Boot, Line, guest_main, start_info};

guest_main!(main);

const IDENT: u16 = 0x5356;
/// How long one request may wait for its reply (the first also resolves the MAC).
const REPLY_TIMEOUT_NS: u64 = 10_000_000_000;

fn main(boot: &Boot) -> Result<(), &'static str> {
    let count = boot
        .start_info
        .as_ref()
        .and_then(|info| info.cmdline_value("net.count"))
        .and_then(start_info::parse_u64)
        .unwrap_or(5);
    let mut stack = Stack::new(boot)?;
    let rx = icmp::PacketBuffer::new(slots(icmp::PacketMetadata::EMPTY, 4)?, buffer(1024)?);
    let tx = icmp::PacketBuffer::new(slots(icmp::PacketMetadata::EMPTY, 4)?, buffer(1024)?);
    let mut socket = icmp::Socket::new(rx, tx);
    socket.bind(icmp::Endpoint::Ident(IDENT)).map_err(|_| "cannot bind the ICMP socket")?;
    let handle = stack.sockets.add(socket);
    let peer = IpAddress::Ipv4(stack.peer);
    let (mut min, mut max, mut total, mut received) = (u64::MAX, 0u64, 0u64, 0u64);
    for seq in 0..count as u16 {
        let sent = stack.now_ns();
        send_request(&mut stack, handle, seq, peer)?;
        let mut reply = false;
        stack.run_until(REPLY_TIMEOUT_NS, |stack| {
            reply = got_reply(stack, handle, seq);
            reply
        })?;
        if !reply {
            Line::new()
                .str("net-ping: no reply to request ")
                .dec(u64::from(seq))
                .str(" irqs=")
                .dec(u64::from(NET_INTERRUPTS.load(Ordering::Acquire)))
                .str(" timer_irqs=")
                .dec(u64::from(TIMER_INTERRUPTS.load(Ordering::Acquire)))
                .print();
            continue;
        }
        let rtt = (stack.now_ns() - sent) / 1000;
        Line::new().str("net-ping: reply ").dec(u64::from(seq)).str(" rtt_us=").dec(rtt).print();
        min = min.min(rtt);
        max = max.max(rtt);
        total += rtt;
        received += 1;
    }
    let mut line = Line::new();
    line.str("net-ping: sent=").dec(count).str(" received=").dec(received);
    if received > 0 {
        line.str(" rtt_us min=").dec(min).str(" avg=").dec(total / received).str(" max=").dec(max);
    }
    line.str(" rx_frames=").dec(stack.device.rx_frames).str(" tx_frames=").dec(stack.device.tx_frames);
    line.str(" irqs=").dec(u64::from(NET_INTERRUPTS.load(Ordering::Acquire)));
    line.str(" timer_irqs=").dec(u64::from(TIMER_INTERRUPTS.load(Ordering::Acquire)));
    line.print();
    if received != count {
        return Err("some echo requests got no reply");
    }
    Ok(())
}

fn send_request(stack: &mut Stack, handle: SocketHandle, seq: u16, peer: IpAddress) -> Result<(), &'static str> {
    let data = *b"splitvisor-net-ping-payload-0123";
    let repr = Icmpv4Repr::EchoRequest { ident: IDENT, seq_no: seq, data: &data };
    let socket = stack.sockets.get_mut::<icmp::Socket>(handle);
    let payload = socket.send(repr.buffer_len(), peer).map_err(|_| "cannot queue the echo request")?;
    let mut packet = Icmpv4Packet::new_unchecked(payload);
    repr.emit(&mut packet, &ChecksumCapabilities::default());
    Ok(())
}

fn got_reply(stack: &mut Stack, handle: SocketHandle, seq: u16) -> bool {
    let socket = stack.sockets.get_mut::<icmp::Socket>(handle);
    while socket.can_recv() {
        let Ok((payload, _)) = socket.recv() else { return false };
        let Ok(packet) = Icmpv4Packet::new_checked(payload) else { continue };
        if let Ok(Icmpv4Repr::EchoReply { ident: IDENT, seq_no, .. }) =
            Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default())
        {
            if seq_no == seq {
                return true;
            }
        }
    }
    false
}
