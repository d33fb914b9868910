//! `net-echo`: a TCP echo server the host connects to.
//!
//! Listens on `net.port=N` (default 7) at `net.ip`, echoes whatever a client sends until
//! the client closes its side, then closes its own. Serves `net.conns=N` connections (default
//! 1) one after the other, reports the bytes echoed per connection, and passes once all are
//! done.

#![no_std]
#![no_main]

use smoltcp::socket::tcp;
use smoltcp::socket::tcp::State;
use splitvisor_guest_kit::netstack::{Stack, buffer};
use splitvisor_guest_kit::{Boot, Line, guest_main, start_info};

guest_main!(main);

/// How long the server waits for a client, or for a connection to make progress.
const IDLE_TIMEOUT_NS: u64 = 600_000_000_000;
const WINDOW: usize = 64 * 1024;

fn main(boot: &Boot) -> Result<(), &'static str> {
    let info = boot.start_info.as_ref();
    let value = |key| info.and_then(|info| info.cmdline_value(key)).and_then(start_info::parse_u64);
    let port = value("net.port").unwrap_or(7) as u16;
    let conns = value("net.conns").unwrap_or(1);
    let mut stack = Stack::new(boot)?;
    let socket = tcp::Socket::new(tcp::SocketBuffer::new(buffer(WINDOW)?), tcp::SocketBuffer::new(buffer(WINDOW)?));
    let handle = stack.sockets.add(socket);
    let chunk = buffer(8192)?;
    for conn in 0..conns {
        stack.sockets.get_mut::<tcp::Socket>(handle).listen(port).map_err(|_| "cannot listen")?;
        Line::new().str("net-echo: listening on port ").dec(u64::from(port)).print();
        let mut echoed = 0u64;
        let mut established = false;
        let finished = stack.run_until(IDLE_TIMEOUT_NS, |stack| {
            let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
            if socket.state() == State::Established && !established {
                established = true;
            }
            while socket.can_recv() && socket.send_capacity() > socket.send_queue() {
                let room = (socket.send_capacity() - socket.send_queue()).min(chunk.len());
                let Ok(n) = socket.recv_slice(&mut chunk[..room]) else { break };
                if n == 0 {
                    break;
                }
                if socket.send_slice(&chunk[..n]).is_err() {
                    break;
                }
                echoed += n as u64;
            }
            if established && !socket.may_recv() && socket.send_queue() == 0 && socket.state() == State::CloseWait {
                socket.close();
            }
            established && matches!(socket.state(), State::Closed | State::TimeWait | State::Listen)
        })?;
        if !finished {
            return Err("the connection made no progress");
        }
        Line::new()
            .str("net-echo: connection ")
            .dec(conn)
            .str(" closed, echoed_bytes=")
            .dec(echoed)
            .print();
        stack.sockets.get_mut::<tcp::Socket>(handle).abort();
        stack.poll();
    }
    Line::new()
        .str("net-echo: rx_frames=")
        .dec(stack.device.rx_frames)
        .str(" tx_frames=")
        .dec(stack.device.tx_frames)
        .str(" rx_dropped=")
        .dec(stack.device.rx_dropped)
        .print();
    Ok(())
}
