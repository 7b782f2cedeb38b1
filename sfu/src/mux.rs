//! One UDP port for every participant's media (`sfu.udp_port`).
//!
//! webrtc's peer connections each bind and read a socket of their own. Here
//! each connection gets a [`Runtime`] whose sockets are views of one shared
//! socket. A reader task routes every datagram to its connection. A STUN
//! binding request goes by its ICE username, which starts with the SFU's
//! ufrag for that connection, and teaches the route its sender's address
//! when it proves the connection's password; everything else goes by that
//! address. The SFU chooses ufrags and passwords itself ([`Mux::endpoint`]),
//! so it knows them before the connection exists. Sends wait in an
//! [`Outbox`] and leave the shared socket in `sendmmsg` batches.
//!
//! The reader drains the socket before it yields (it only routes, which is
//! cheap): when the server is busy, as with a hundred people joining at
//! once, the connectivity checks and handshakes of every connection would
//! otherwise wait in the runtime's queue behind every other task, as one
//! task. A thread of its own did that too, but cost a third more CPU per
//! forwarded packet (a cross-thread wake per datagram received).
//!
//! The driver still binds a socket of its own when it starts, and its
//! candidates name that socket's port. That socket is closed at once, and
//! [`Endpoint::public`] puts the shared port in its place in every
//! description and candidate that goes to the client.

use bytes::{Bytes, BytesMut};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tracing::{debug, trace, warn};

use crate::outbox::Outbox;
use confer_transport::ice::binding_request;
use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime,
    Transmit,
};

/// Datagrams held for a connection whose driver has not read them yet;
/// more are dropped, as a full socket buffer would.
const INBOX: usize = 1024;
/// Addresses one connection may receive from. A client checks a few
/// candidate pairs; past this, the address longest without a check is
/// forgotten (a client that roams keeps checking the address it uses).
const MAX_ADDRESSES: usize = 16;
/// Largest datagram read; WebRTC keeps under 1500.
const MAX_DATAGRAM: usize = 2048;
/// The reader's receive buffer is carved into datagrams from blocks this large.
const BLOCK: usize = 64 * 1024;
/// Most datagrams read before the reader lets other tasks run.
const READ_BURST: u32 = 1024;
/// Kernel buffers of the shared socket. It carries every participant, and
/// when the server falls behind, as much has to wait here as waited in a
/// socket per participant before: with 4 MiB, many-rooms (150 participants
/// beyond one core) collapsed to a tenth of its throughput with a third
/// lost; with 32 MiB it ran as with a socket each.
const SOCKET_BUFFER: usize = 32 * 1024 * 1024;

/// The shared socket and its reader task, which stops when this is dropped.
pub(crate) struct Mux {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    sender: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// Sends; the reader task reads a handle of its own.
    outbox: Outbox,
    local: SocketAddr,
    routes: Mutex<Routes>,
    /// Datagrams that came for no connection, or as a check that failed
    /// its MESSAGE-INTEGRITY.
    unrouted: AtomicU64,
    /// Datagrams for a connection whose driver was too far behind.
    dropped_arriving: AtomicU64,
    /// Datagrams not sent because the socket's buffer was full, or too
    /// many were waiting for it.
    dropped_sending: AtomicU64,
    /// When the last warning about dropping went out, in ms after `started`
    /// (0: never).
    warned_ms: AtomicU64,
    started: Instant,
}

/// What the shared socket has seen, for operators (admin API).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaSocket {
    /// The UDP port every participant's media uses.
    pub port: u16,
    /// Datagrams from addresses no participant has checked from (stale
    /// connections, scans) and forged connectivity checks: not a load sign.
    pub unrouted: u64,
    /// Datagrams dropped on arrival because their connection was too far
    /// behind: the server is short of CPU.
    pub dropped_arriving: u64,
    /// Datagrams dropped because the socket's send buffer was full, or too
    /// many were waiting to be sent: short of CPU, or of `net.core.wmem_max`.
    pub dropped_sending: u64,
}

/// Overload warnings are at most this often.
const WARN_EVERY_MS: u64 = 10_000;

#[derive(Default)]
struct Routes {
    by_ufrag: HashMap<String, Weak<dyn Destination>>,
    by_addr: HashMap<SocketAddr, Weak<dyn Destination>>,
    /// Each ufrag's learnt addresses, the one checked longest ago first.
    addresses: HashMap<String, VecDeque<SocketAddr>>,
}

/// Whom the shared socket's datagrams are for: a webrtc peer connection's
/// [`Endpoint`], or a downlink of our own, which handles them as they come.
pub(crate) trait Destination: Send + Sync {
    /// The ICE password its checks must prove.
    fn pwd(&self) -> &str;
    /// A datagram from `from`, an address one of its checks proved.
    fn deliver(&self, from: SocketAddr, datagram: Bytes) -> Routed;
}

/// A destination's place on the shared socket: its ICE credentials, its
/// routes (gone when this is dropped), and the way out.
pub(crate) struct Attachment {
    pub(crate) ufrag: String,
    pub(crate) pwd: String,
    shared: Arc<Shared>,
}

impl Attachment {
    /// Queues `datagram` for `to` (see [`Outbox::push`]).
    pub(crate) fn send(&self, to: SocketAddr, datagram: &[u8]) {
        let dropped = self.shared.outbox.push(to, datagram);
        self.shared.dropped_sending(dropped);
    }

    /// The shared socket's address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut routes = self.shared.routes.lock().unwrap();
        routes.by_ufrag.remove(&self.ufrag);
        routes.addresses.remove(&self.ufrag);
        routes.by_addr.retain(|_, e| e.strong_count() > 0);
    }
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("ufrag", &self.ufrag)
            .field("shared", &self.shared.local)
            .finish()
    }
}

/// One peer connection's share of the socket.
#[derive(Debug)]
pub(crate) struct Endpoint {
    attachment: Attachment,
    inbox: Mutex<Inbox>,
    /// The port its driver bound and named in its candidates (0 until then).
    bound: AtomicU16,
}

#[derive(Default, Debug)]
struct Inbox {
    datagrams: VecDeque<(SocketAddr, Bytes)>,
    waker: Option<Waker>,
}

impl Mux {
    /// Binds `addr` (port 0: any free port). Must run inside tokio.
    pub(crate) fn bind(addr: SocketAddr) -> io::Result<Mux> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // Best effort: the system caps them at net.core.rmem_max/wmem_max.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        // Linux reports twice what it grants (the rest is its bookkeeping).
        let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
        if granted < SOCKET_BUFFER {
            warn!(
                granted,
                wanted = SOCKET_BUFFER,
                "the media socket's receive buffer is small for a busy server: \
                 raise net.core.rmem_max and wmem_max to {SOCKET_BUFFER} (deploy/README.md)"
            );
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        let socket = std::net::UdpSocket::from(socket);
        let local = socket.local_addr()?;
        let reading = socket.try_clone()?;
        let shared = Arc::new(Shared {
            outbox: Outbox::new(socket),
            local,
            routes: Mutex::new(Routes::default()),
            unrouted: AtomicU64::new(0),
            dropped_arriving: AtomicU64::new(0),
            dropped_sending: AtomicU64::new(0),
            warned_ms: AtomicU64::new(0),
            started: Instant::now(),
        });
        let reading = UdpSocket::from_std(reading)?;
        let reader = tokio::spawn(tokio::task::unconstrained(read_loop(
            shared.clone(),
            reading,
        )));
        let sender = tokio::spawn(send_loop(shared.clone()));
        Ok(Mux {
            shared,
            reader,
            sender,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    pub(crate) fn stats(&self) -> MediaSocket {
        let s = &self.shared;
        MediaSocket {
            port: s.local.port(),
            unrouted: s.unrouted.load(Ordering::Relaxed),
            dropped_arriving: s.dropped_arriving.load(Ordering::Relaxed),
            dropped_sending: s.dropped_sending.load(Ordering::Relaxed),
        }
    }

    /// A new connection's share, with the ICE credentials its peer
    /// connection must use (see [`Endpoint::credentials`]).
    pub(crate) fn endpoint(&self) -> Arc<Endpoint> {
        self.attach(|attachment| {
            Arc::new(Endpoint {
                attachment,
                inbox: Mutex::new(Inbox::default()),
                bound: AtomicU16::new(0),
            })
        })
    }

    /// A new destination, made by `make` from its attachment (fresh ICE
    /// credentials), and routed to by its ufrag from now on.
    pub(crate) fn attach<D: Destination + 'static>(
        &self,
        make: impl FnOnce(Attachment) -> Arc<D>,
    ) -> Arc<D> {
        let mut routes = self.shared.routes.lock().unwrap();
        loop {
            // 24 and 32 characters of ice-char: RFC 8839 asks for at least
            // 4 and 22, and 24 random characters never collide in practice.
            let ufrag = random_ice_chars(24);
            if routes.by_ufrag.contains_key(&ufrag) {
                continue;
            }
            let destination = make(Attachment {
                ufrag: ufrag.clone(),
                pwd: random_ice_chars(32),
                shared: self.shared.clone(),
            });
            let weak: Weak<dyn Destination> = Arc::downgrade(&destination) as Weak<dyn Destination>;
            routes.by_ufrag.insert(ufrag, weak);
            return destination;
        }
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.reader.abort();
        self.sender.abort();
    }
}

impl Endpoint {
    /// ICE username fragment and password for its peer connection.
    pub(crate) fn credentials(&self) -> (String, String) {
        (self.attachment.ufrag.clone(), self.attachment.pwd.clone())
    }

    /// A runtime for its peer connection: webrtc's own, except that sockets
    /// are this endpoint's views of the shared one.
    pub(crate) fn runtime(self: &Arc<Self>) -> Option<Arc<dyn Runtime>> {
        let inner = webrtc::runtime::default_runtime()?;
        Some(Arc::new(MuxRuntime {
            inner,
            endpoint: self.clone(),
        }))
    }

    /// `text` (a description or a candidate) as the client must see it:
    /// the port the driver bound replaced by the shared one.
    pub(crate) fn public(&self, text: &str) -> String {
        let bound = self.bound.load(Ordering::Acquire);
        if bound == 0 {
            return text.to_owned();
        }
        replace_port(text, bound, self.attachment.local_addr().port())
    }
}

impl Destination for Endpoint {
    fn pwd(&self) -> &str {
        &self.attachment.pwd
    }

    /// Into its inbox, for its driver to read.
    fn deliver(&self, from: SocketAddr, datagram: Bytes) -> Routed {
        let mut inbox = self.inbox.lock().unwrap();
        if inbox.datagrams.len() >= INBOX {
            return Routed::Full;
        }
        inbox.datagrams.push_back((from, datagram));
        if let Some(waker) = inbox.waker.take() {
            drop(inbox);
            waker.wake();
        }
        Routed::Delivered
    }
}

fn random_ice_chars(n: usize) -> String {
    const ICE_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ICE_CHARS[rng.random_range(0..ICE_CHARS.len())] as char)
        .collect()
}

/// Unconstrained by tokio's budget: it yields once the socket is empty, or
/// after [`READ_BURST`] datagrams so that a flood cannot hold the thread.
async fn read_loop(shared: Arc<Shared>, socket: UdpSocket) {
    let mut buf = BytesMut::with_capacity(BLOCK);
    let mut burst = 0;
    loop {
        burst += 1;
        if burst == READ_BURST {
            burst = 0;
            tokio::task::yield_now().await;
        }
        if buf.capacity() < MAX_DATAGRAM {
            // The datagrams split off before keep the old block alive until
            // their drivers have read them.
            buf = BytesMut::with_capacity(BLOCK);
        }
        let from = match socket.recv_buf_from(&mut buf).await {
            Ok((_, from)) => from,
            Err(e) => {
                // ICMP errors for one peer surface here; the socket lives on.
                trace!("shared socket: {e}");
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                ) {
                    warn!("shared UDP socket {}: {e}", shared.local);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                buf.clear();
                continue;
            }
        };
        let datagram = buf.split().freeze();
        match shared.route(from, datagram) {
            Routed::Delivered => {}
            Routed::Nowhere => {
                let n = shared.unrouted.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    debug!(%from, unrouted = n + 1, "datagram for no connection, or a forged check, dropped");
                }
            }
            Routed::Full => {
                shared.dropped_arriving.fetch_add(1, Ordering::Relaxed);
                shared.overloaded();
            }
        }
    }
}

/// Sends what the drivers left in the outbox, at the end of each round.
async fn send_loop(shared: Arc<Shared>) {
    loop {
        let sent = shared.outbox.send_when_ready().await;
        shared.dropped_sending(sent.dropped);
    }
}

pub(crate) enum Routed {
    Delivered,
    /// For no connection, or a forged check.
    Nowhere,
    /// Its connection's inbox was full.
    Full,
}

impl Shared {
    /// Hands `datagram` to its connection.
    ///
    /// A binding request goes to the connection its username names, and
    /// only if it proves the connection's ICE password (MESSAGE-INTEGRITY):
    /// then its sender's address routes to that connection from now on.
    /// Everything else goes by the sender's address. So an address is never
    /// learnt from a forged check, and a client that reconnects from an
    /// address it used before is routed to its new connection.
    fn route(&self, from: SocketAddr, datagram: Bytes) -> Routed {
        let destination = {
            let mut routes = self.routes.lock().unwrap();
            let named = binding_request(&datagram).and_then(|req| {
                let weak = routes.by_ufrag.get(req.ufrag)?.clone();
                Some((req, weak.upgrade()?, weak))
            });
            match named {
                Some((req, d, weak)) => {
                    if !req.authentic(&datagram, d.pwd().as_bytes()) {
                        return Routed::Nowhere;
                    }
                    routes.learn(req.ufrag, weak, from);
                    d
                }
                None => match routes.by_addr.get(&from).and_then(Weak::upgrade) {
                    Some(d) => d,
                    None => return Routed::Nowhere,
                },
            }
        };
        // Outside the routes' lock: a downlink handles it right here.
        destination.deliver(from, datagram)
    }

    /// Called on every datagram dropped for want of CPU or buffer; warns
    /// now and then, with the totals.
    fn dropped_sending(&self, n: u64) {
        if n > 0 {
            self.dropped_sending.fetch_add(n, Ordering::Relaxed);
            self.overloaded();
        }
    }

    fn overloaded(&self) {
        let now = (self.started.elapsed().as_millis() as u64).max(1);
        let last = self.warned_ms.load(Ordering::Relaxed);
        if (last != 0 && now < last + WARN_EVERY_MS)
            || self
                .warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        warn!(
            dropped_arriving = self.dropped_arriving.load(Ordering::Relaxed),
            dropped_sending = self.dropped_sending.load(Ordering::Relaxed),
            "the media socket is dropping datagrams: the server is short of CPU \
             (or of socket buffer, net.core.rmem_max/wmem_max)"
        );
    }
}

impl Routes {
    /// Routes `from` to the destination of `ufrag`, as its most recently
    /// checked address.
    fn learn(&mut self, ufrag: &str, destination: Weak<dyn Destination>, from: SocketAddr) {
        let addresses = self.addresses.entry(ufrag.to_owned()).or_default();
        addresses.retain(|a| *a != from);
        if addresses.len() >= MAX_ADDRESSES
            && let Some(stale) = addresses.pop_front()
            && self
                .by_addr
                .get(&stale)
                .is_some_and(|w| Weak::ptr_eq(w, &destination))
        {
            self.by_addr.remove(&stale);
        }
        addresses.push_back(from);
        self.by_addr.insert(from, destination);
    }
}

/// `text` with `from` replaced by `to` as the port of candidates
/// (`candidate:f c udp prio addr PORT typ …`, with or without `a=`) and of
/// m-lines (`m=audio PORT …`); every other line as it was.
fn replace_port(text: &str, from: u16, to: u16) -> String {
    let from = from.to_string();
    let to = to.to_string();
    let mut out = String::with_capacity(text.len() + 16);
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let field = if line.starts_with("a=candidate:") || line.starts_with("candidate:") {
            Some(5)
        } else if line.starts_with("m=") {
            Some(1)
        } else {
            None
        };
        let Some(field) = field else {
            out.push_str(line);
            continue;
        };
        let (body, cr) = match line.strip_suffix('\r') {
            Some(body) => (body, "\r"),
            None => (line, ""),
        };
        let mut fields: Vec<&str> = body.split(' ').collect();
        if fields.get(field) == Some(&from.as_str()) {
            fields[field] = &to;
        }
        out.push_str(&fields.join(" "));
        out.push_str(cr);
    }
    out
}

/// webrtc's runtime, with [`MuxSocket`]s in place of the sockets it binds.
#[derive(Debug)]
struct MuxRuntime {
    inner: Arc<dyn Runtime>,
    endpoint: Arc<Endpoint>,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Runtime for MuxRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(
        &self,
        pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        // Only its port is kept, to be rewritten in what the client sees.
        let bound = socket.local_addr()?.port();
        self.endpoint.bound.store(bound, Ordering::Release);
        Ok(Arc::new(MuxSocket {
            endpoint: self.endpoint.clone(),
        }))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> BoxFuture<'a, io::Result<Arc<dyn AsyncTcpStream>>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        self.inner.resolve_host(host)
    }

    fn now(&self) -> std::time::Instant {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.yield_now()
    }

    fn name(&self) -> &'static str {
        "confer-mux"
    }
}

/// A connection's view of the shared socket: it reads what the reader task
/// routed to it, and sends from the shared socket.
#[derive(Debug)]
struct MuxSocket {
    endpoint: Arc<Endpoint>,
}

impl AsyncUdpSocket for MuxSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.endpoint.attachment.local_addr())
    }

    fn poll_send(&self, _cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        // max_gso_segments is 1, so every transmit is one datagram. Never
        // Pending: every connection's driver sends on this socket, and
        // waiting for room would need a waker per driver. Without room the
        // datagram is dropped, as a router would; NACKs and DTLS
        // retransmissions recover.
        self.endpoint
            .attachment
            .send(transmit.destination, transmit.contents);
        Poll::Ready(Ok(transmit.contents.len()))
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbox = self.endpoint.inbox.lock().unwrap();
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((from, datagram)) = inbox.datagrams.pop_front() else {
                break;
            };
            let buf = &mut bufs[n];
            let len = datagram.len().min(buf.len());
            buf[..len].copy_from_slice(&datagram[..len]);
            let mut m = RecvMeta::default();
            m.addr = from;
            m.len = len;
            m.stride = len.max(1);
            meta[n] = m;
            n += 1;
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        match &inbox.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inbox.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_port_gives_way_to_the_shared_one_in_candidates_and_m_lines() {
        let sdp = "v=0\r\n\
                   m=audio 41234 UDP/TLS/RTP/SAVPF 111\r\n\
                   c=IN IP4 127.0.0.1\r\n\
                   a=candidate:1 1 udp 2130706431 127.0.0.1 41234 typ host\r\n\
                   a=candidate:2 1 udp 2130706431 127.0.0.1 41235 typ host\r\n\
                   a=rtcp:9 IN IP4 0.0.0.0\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
                   a=msid:41234 41234\r\n";
        let out = replace_port(sdp, 41234, 7882);
        assert_eq!(
            out,
            "v=0\r\n\
             m=audio 7882 UDP/TLS/RTP/SAVPF 111\r\n\
             c=IN IP4 127.0.0.1\r\n\
             a=candidate:1 1 udp 2130706431 127.0.0.1 7882 typ host\r\n\
             a=candidate:2 1 udp 2130706431 127.0.0.1 41235 typ host\r\n\
             a=rtcp:9 IN IP4 0.0.0.0\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
             a=msid:41234 41234\r\n"
        );
        assert_eq!(
            replace_port(
                "candidate:1 1 udp 2130706431 10.0.0.1 41234 typ host",
                41234,
                7882
            ),
            "candidate:1 1 udp 2130706431 10.0.0.1 7882 typ host"
        );
    }

    fn socket(endpoint: &Arc<Endpoint>) -> MuxSocket {
        MuxSocket {
            endpoint: endpoint.clone(),
        }
    }

    /// The next datagram `socket` reads within `wait`, with its sender.
    async fn next(socket: &MuxSocket, wait: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        let mut buf = [0u8; 2048];
        let mut meta = [RecvMeta::default()];
        let n = std::future::poll_fn(|cx| {
            socket.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)
        });
        tokio::time::timeout(wait, n).await.ok()?.unwrap();
        Some((meta[0].addr, buf[..meta[0].len].to_vec()))
    }

    const SOON: Duration = Duration::from_secs(5);
    const NEVER: Duration = Duration::from_millis(100);

    fn check(username: &str, password: &str) -> Vec<u8> {
        let mut out = Vec::new();
        confer_transport::ice::connectivity_check(
            username,
            password.as_bytes(),
            false,
            &[7; 12],
            &mut out,
        );
        out
    }

    fn check_for(endpoint: &Endpoint) -> Vec<u8> {
        check(
            &format!("{}:cli", endpoint.attachment.ufrag),
            &endpoint.attachment.pwd,
        )
    }

    #[tokio::test]
    async fn datagrams_reach_the_connection_whose_ufrag_they_name_and_only_it() {
        let mux = Mux::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = mux.endpoint();
        let b = mux.endpoint();
        let (sa, sb) = (socket(&a), socket(&b));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();
        let to = mux.local_addr();
        // Before any check, nothing from this client goes anywhere.
        client.send_to(b"\x80early", to).await.unwrap();
        let check = check_for(&b);
        client.send_to(&check, to).await.unwrap();
        client.send_to(b"\x80media", to).await.unwrap();

        assert_eq!(next(&sb, SOON).await, Some((me, check)));
        assert_eq!(next(&sb, SOON).await, Some((me, b"\x80media".to_vec())));
        assert_eq!(next(&sa, NEVER).await, None);

        // Gone with its connection: its routes go too.
        drop(sb);
        drop(b);
        let routes = mux.shared.routes.lock().unwrap();
        assert_eq!(routes.by_ufrag.len(), 1);
        assert!(routes.by_addr.is_empty());
    }

    #[tokio::test]
    async fn a_check_without_the_password_teaches_nothing() {
        let mux = Mux::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = mux.endpoint();
        let sa = socket(&a);
        let forger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = mux.local_addr();
        let name = format!("{}:cli", a.attachment.ufrag);
        for forged in [
            check(&name, "not the password"),
            check(&name, "nor this one"),
        ] {
            forger.send_to(&forged, to).await.unwrap();
        }
        forger.send_to(b"\x80media", to).await.unwrap();
        assert_eq!(next(&sa, NEVER).await, None);
        assert!(mux.shared.routes.lock().unwrap().by_addr.is_empty());
        assert_eq!(mux.stats().unrouted, 3);
    }

    #[tokio::test]
    async fn a_roaming_client_keeps_its_route_and_the_stalest_address_goes() {
        let mux = Mux::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = mux.endpoint();
        let sa = socket(&a);
        let to = mux.local_addr();
        let mut clients = Vec::new();
        for _ in 0..=MAX_ADDRESSES {
            clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        // The first address checks again after the second: the second is
        // then the stalest, and the seventeenth address pushes it out.
        let order = [0, 1, 0]
            .into_iter()
            .chain(2..=MAX_ADDRESSES)
            .collect::<Vec<_>>();
        for i in order {
            clients[i].send_to(&check_for(&a), to).await.unwrap();
            assert!(next(&sa, SOON).await.is_some());
        }
        for (i, client) in clients.iter().enumerate() {
            client.send_to(&[0x80, i as u8], to).await.unwrap();
            let got = next(&sa, if i == 1 { NEVER } else { SOON }).await;
            assert_eq!(got.is_some(), i != 1, "address {i}");
        }
        let routes = mux.shared.routes.lock().unwrap();
        assert_eq!(routes.addresses[&a.attachment.ufrag].len(), MAX_ADDRESSES);
        drop(routes);
    }

    #[tokio::test]
    async fn an_address_checked_for_a_new_connection_moves_to_it() {
        let mux = Mux::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (old, new) = (mux.endpoint(), mux.endpoint());
        let (s_old, s_new) = (socket(&old), socket(&new));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = mux.local_addr();
        client.send_to(&check_for(&old), to).await.unwrap();
        assert!(next(&s_old, SOON).await.is_some());
        // The client reconnects from the same address while the old
        // connection still lingers.
        client.send_to(&check_for(&new), to).await.unwrap();
        assert!(next(&s_new, SOON).await.is_some());
        client.send_to(b"\x80media", to).await.unwrap();
        assert_eq!(next(&s_new, SOON).await.unwrap().1, b"\x80media");
        assert_eq!(next(&s_old, NEVER).await, None);
        // The old connection forgetting its addresses leaves the new route.
        drop(s_old);
        drop(old);
        assert_eq!(mux.shared.routes.lock().unwrap().by_addr.len(), 1);
    }

    #[tokio::test]
    async fn a_connection_too_far_behind_loses_what_its_inbox_cannot_hold_and_it_is_counted() {
        let mux = Mux::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let a = mux.endpoint();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = mux.local_addr();
        client.send_to(&check_for(&a), to).await.unwrap();
        // Nobody reads `a`'s inbox: the check and INBOX - 1 packets fit.
        for i in 0..INBOX + 10 {
            client.send_to(&[0x80, i as u8], to).await.unwrap();
        }
        let deadline = Instant::now() + SOON;
        while mux.stats().dropped_arriving < 11 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stats = mux.stats();
        assert_eq!((stats.dropped_arriving, stats.unrouted), (11, 0));
        assert_eq!(a.inbox.lock().unwrap().datagrams.len(), INBOX);
        assert_eq!(stats.port, to.port());
    }
}
