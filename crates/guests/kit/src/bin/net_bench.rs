//! `net-bench`: TCP and UDP throughput against a host peer at `net.peer`.
//!
//! 1. `tcp-tx`: connects to port `net.bench.port` (default 5201) and sends
//!    `net.bench.kib=N` KiB (default 1024), then closes.
//! 2. `tcp-rx`: connects to port + 1 and receives until the host closes.
//! 3. `udp-tx`: sends `net.bench.packets=N` datagrams of 64 bytes (default 2000) to port + 2
//!    as fast as the device takes them, then one datagram "end".
//!
//! Each result line gives bytes or packets and the guest's own nanoseconds (kvm-clock); the
//! host peer measures the same transfers on its side.

#![no_std]
#![no_main]

use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{IpAddress, IpEndpoint};
use splitvisor_guest_kit::netstack::{Stack, buffer, slots};
use splitvisor_guest_kit::{Boot, Line, guest_main, start_info};

guest_main!(main);

const TIMEOUT_NS: u64 = 600_000_000_000;
const WINDOW: usize = 64 * 1024;

fn main(boot: &Boot) -> Result<(), &'static str> {
    let info = boot.start_info.as_ref();
    let value = |key| info.and_then(|info| info.cmdline_value(key)).and_then(start_info::parse_u64);
    let port = value("net.bench.port").unwrap_or(5201) as u16;
    let bytes = value("net.bench.kib").unwrap_or(1024) * 1024;
    let packets = value("net.bench.packets").unwrap_or(2000);
    let mut stack = Stack::new(boot)?;
    let peer = IpAddress::Ipv4(stack.peer);
    let chunk = buffer(16384)?;
    for (i, byte) in chunk.iter_mut().enumerate() {
        *byte = (i * 7 + 3) as u8;
    }

    // TCP, guest to host.
    let socket = tcp::Socket::new(tcp::SocketBuffer::new(buffer(WINDOW)?), tcp::SocketBuffer::new(buffer(WINDOW)?));
    let handle = stack.sockets.add(socket);
    connect(&mut stack, handle, IpEndpoint::new(peer, port), 49152)?;
    let start = stack.now_ns();
    let mut sent = 0u64;
    let done = stack.run_until(TIMEOUT_NS, |stack| {
        let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
        while sent < bytes && socket.can_send() {
            let want = ((bytes - sent) as usize).min(chunk.len());
            match socket.send_slice(&chunk[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n as u64,
            }
        }
        if sent == bytes && socket.send_queue() == 0 {
            socket.close();
        }
        sent == bytes && matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait | tcp::State::FinWait2)
    })?;
    let ns = stack.now_ns() - start;
    if !done {
        return Err("tcp-tx did not complete");
    }
    report("tcp-tx", sent, ns);
    stack.sockets.get_mut::<tcp::Socket>(handle).abort();
    stack.poll();

    // TCP, host to guest.
    connect(&mut stack, handle, IpEndpoint::new(peer, port + 1), 49153)?;
    let start = stack.now_ns();
    let mut received = 0u64;
    let done = stack.run_until(TIMEOUT_NS, |stack| {
        let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
        while socket.can_recv() {
            match socket.recv_slice(&mut chunk[..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n as u64,
            }
        }
        if !socket.may_recv() && socket.state() == tcp::State::CloseWait {
            socket.close();
        }
        received > 0 && matches!(socket.state(), tcp::State::Closed | tcp::State::LastAck | tcp::State::TimeWait)
    })?;
    let ns = stack.now_ns() - start;
    if !done {
        return Err("tcp-rx did not complete");
    }
    report("tcp-rx", received, ns);
    stack.sockets.get_mut::<tcp::Socket>(handle).abort();
    stack.poll();

    // UDP, guest to host.
    let udp_socket = udp::Socket::new(
        udp::PacketBuffer::new(slots(udp::PacketMetadata::EMPTY, 4)?, buffer(2048)?),
        udp::PacketBuffer::new(slots(udp::PacketMetadata::EMPTY, 64)?, buffer(64 * 128)?),
    );
    let udp_handle = stack.sockets.add(udp_socket);
    stack.sockets.get_mut::<udp::Socket>(udp_handle).bind(49154).map_err(|_| "cannot bind UDP")?;
    let target = IpEndpoint::new(peer, port + 2);
    let start = stack.now_ns();
    let mut datagrams = 0u64;
    let done = stack.run_until(TIMEOUT_NS, |stack| {
        let socket = stack.sockets.get_mut::<udp::Socket>(udp_handle);
        while datagrams < packets && socket.can_send() {
            if socket.send_slice(&chunk[..64], target).is_err() {
                break;
            }
            datagrams += 1;
        }
        datagrams == packets && socket.send_queue() == 0
    })?;
    let ns = stack.now_ns() - start;
    if !done {
        return Err("udp-tx did not complete");
    }
    let socket = stack.sockets.get_mut::<udp::Socket>(udp_handle);
    let _ = socket.send_slice(b"end", target);
    stack.run_until(1_000_000_000, |stack| stack.sockets.get_mut::<udp::Socket>(udp_handle).send_queue() == 0)?;
    Line::new().str("net-bench: udp-tx packets=").dec(datagrams).str(" ns=").dec(ns).print();
    Ok(())
}

fn connect(stack: &mut Stack, handle: smoltcp::iface::SocketHandle, to: IpEndpoint, local: u16) -> Result<(), &'static str> {
    let cx = stack.iface.context();
    stack.sockets.get_mut::<tcp::Socket>(handle).connect(cx, to, local).map_err(|_| "cannot connect")?;
    let up = stack.run_until(30_000_000_000, |stack| {
        let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
        socket.state() == tcp::State::Established || !socket.is_open()
    })?;
    if !up || stack.sockets.get_mut::<tcp::Socket>(handle).state() != tcp::State::Established {
        return Err("cannot connect to the host peer");
    }
    Ok(())
}

fn report(what: &str, bytes: u64, ns: u64) {
    Line::new().str("net-bench: ").str(what).str(" bytes=").dec(bytes).str(" ns=").dec(ns).print();
}
