//! Datagrams waiting to leave the shared media socket, sent in batches.
//!
//! Every connection's driver hands its datagrams over one at a time (it
//! makes one pass per forwarded packet), and sent at once each would cost a
//! system call. Here they wait, and leave in `sendmmsg` calls: as soon as a
//! full batch is waiting, or when the runtime has run the other tasks that
//! were ready (the other receivers of the same packet) and the sender task's
//! turn comes. So a busy server makes one call per [`BATCH`] datagrams, and
//! an idle one delays a datagram by one task's turn.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;

/// Most bytes waiting. Past this the socket is not keeping up (or the
/// sender task is starved), and more are dropped, as a full socket buffer
/// would: NACKs and DTLS retransmissions recover.
const MAX_WAITING: usize = 4 * 1024 * 1024;

/// Datagrams per `sendmmsg` call, and the most that wait for the sender task.
const BATCH: usize = 64;

/// Datagrams in one buffer, in the order they were handed over.
#[derive(Default)]
pub(crate) struct Datagrams {
    bytes: Vec<u8>,
    /// Destination and end (in `bytes`) of each datagram.
    ends: Vec<(SocketAddr, usize)>,
}

impl Datagrams {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.bytes.extend_from_slice(datagram);
        self.ends.push((to, self.bytes.len()));
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|(_, end)| *end));
        self.ends
            .iter()
            .zip(starts)
            .map(|((to, end), start)| (*to, &self.bytes[start..*end]))
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }
}

/// The sending half of the shared socket, and what waits for it.
pub(crate) struct Outbox {
    socket: std::net::UdpSocket,
    waiting: Mutex<Datagrams>,
    /// The buffer a batch is sent from. Held while sending, so batches
    /// leave in the order they were handed over.
    sending: Mutex<Datagrams>,
    /// Wakes the sender task when the first datagram arrives in an empty box.
    ready: tokio::sync::Notify,
}

impl Outbox {
    /// `socket` must be non-blocking.
    pub(crate) fn new(socket: std::net::UdpSocket) -> Outbox {
        Outbox {
            socket,
            waiting: Mutex::default(),
            sending: Mutex::default(),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// Queues `datagram` for `to`, and sends what waits if that makes a full
    /// batch. Returns how many datagrams were dropped for want of room.
    pub(crate) fn push(&self, to: SocketAddr, datagram: &[u8]) -> u64 {
        let mut waiting = self.waiting.lock().unwrap();
        if waiting.bytes.len() + datagram.len() > MAX_WAITING {
            return 1;
        }
        let was_empty = waiting.ends.is_empty();
        waiting.push(to, datagram);
        let full = waiting.len() >= BATCH;
        drop(waiting);
        if was_empty {
            // Stores a permit if the task is busy sending: nothing is missed.
            self.ready.notify_one();
        }
        if !full {
            return 0;
        }
        // Someone else sending will look again when done; else the sender
        // task takes what is left.
        match self.sending.try_lock() {
            Ok(mut batch) => self.send_waiting(&mut batch).dropped,
            Err(_) => 0,
        }
    }

    /// Waits for datagrams, lets the other ready tasks add theirs, and sends
    /// them all: the sender task's loop body.
    pub(crate) async fn send_when_ready(&self) -> Sent {
        self.ready.notified().await;
        tokio::task::yield_now().await;
        let mut batch = self.sending.lock().unwrap();
        self.send_waiting(&mut batch)
    }

    /// Sends what waits, and again while a full batch is waiting. Fewer
    /// are left to the sender task: the first of them woke it.
    fn send_waiting(&self, batch: &mut Datagrams) -> Sent {
        let mut sent = Sent::default();
        loop {
            std::mem::swap(&mut *self.waiting.lock().unwrap(), batch);
            if batch.len() == 0 {
                return sent;
            }
            send(&self.socket, batch, &mut sent);
            if self.waiting.lock().unwrap().len() < BATCH {
                return sent;
            }
        }
    }
}

/// How sending a batch went.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) sent: u64,
    /// For want of room in the socket's send buffer.
    pub(crate) dropped: u64,
    /// Refused for another reason (an address the socket cannot reach).
    pub(crate) failed: u64,
    pub(crate) calls: u64,
}

/// Sends every datagram in `batch` from `socket` (non-blocking), counts
/// them into `sent` and empties `batch`.
fn send(socket: &std::net::UdpSocket, batch: &mut Datagrams, sent: &mut Sent) {
    send_all(socket, batch, sent);
    batch.clear();
}

/// One datagram the kernel refused: counted, then the rest go on.
fn refused(e: io::Error, sent: &mut Sent) {
    if e.kind() == io::ErrorKind::WouldBlock {
        sent.dropped += 1;
    } else {
        tracing::trace!("shared socket send: {e}");
        sent.failed += 1;
    }
}

#[cfg(target_os = "linux")]
fn send_all(socket: &std::net::UdpSocket, batch: &Datagrams, sent: &mut Sent) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let mut all = batch.iter();
    // SAFETY (all below): the headers point into `addrs`, `iovs` and
    // `batch`, which outlive the call, and `n` of each are initialised.
    let mut addrs: [socket2::SockAddr; BATCH] =
        std::array::from_fn(|_| socket2::SockAddr::from(SocketAddr::from(([0u8; 4], 0))));
    let mut iovs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    loop {
        let mut n = 0;
        for (to, datagram) in all.by_ref().take(BATCH) {
            addrs[n] = socket2::SockAddr::from(to);
            iovs[n] = libc::iovec {
                iov_base: datagram.as_ptr() as *mut libc::c_void,
                iov_len: datagram.len(),
            };
            n += 1;
        }
        if n == 0 {
            return;
        }
        for i in 0..n {
            let h = &mut headers[i].msg_hdr;
            h.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
            h.msg_namelen = addrs[i].len();
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < n {
            sent.calls += 1;
            let r =
                unsafe { libc::sendmmsg(fd, headers[done..n].as_mut_ptr(), (n - done) as u32, 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first of the rest was refused; skip it.
                refused(e, sent);
                done += 1;
            } else {
                sent.sent += r as u64;
                done += r as usize;
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn send_all(socket: &std::net::UdpSocket, batch: &Datagrams, sent: &mut Sent) {
    for (to, datagram) in batch.iter() {
        sent.calls += 1;
        match socket.send_to(datagram, to) {
            Ok(_) => sent.sent += 1,
            Err(e) => refused(e, sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn receiver() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    fn sender() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    fn recv(s: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn a_batch_reaches_each_destination_in_order_in_few_calls() {
        let (a, b) = (receiver(), receiver());
        let mut batch = Datagrams::default();
        // More than one sendmmsg holds, sizes from 1 byte to a full MTU.
        for i in 0..100u32 {
            let to = if i % 3 == 0 { &b } else { &a };
            let len = 1 + (i as usize * 37) % 1200;
            let mut d = vec![i as u8; len];
            d[..4.min(len)].copy_from_slice(&i.to_be_bytes()[..4.min(len)]);
            batch.push(to.local_addr().unwrap(), &d);
        }
        let expected: Vec<(SocketAddr, Vec<u8>)> =
            batch.iter().map(|(to, d)| (to, d.to_vec())).collect();
        let mut sent = Sent::default();
        send(&sender(), &mut batch, &mut sent);
        assert_eq!(batch.len(), 0);
        assert_eq!((sent.sent, sent.dropped, sent.failed), (100, 0, 0));
        if cfg!(target_os = "linux") {
            assert_eq!(sent.calls, 2);
        }
        for (to, d) in expected {
            let s = if to == a.local_addr().unwrap() {
                &a
            } else {
                &b
            };
            assert_eq!(recv(s), d);
        }
    }

    #[test]
    fn a_refused_datagram_is_counted_and_the_rest_still_go() {
        let a = receiver();
        let mut batch = Datagrams::default();
        batch.push(a.local_addr().unwrap(), b"first");
        // An IPv4 socket cannot send to an IPv6 address.
        batch.push("[::1]:9".parse().unwrap(), b"nowhere");
        batch.push(a.local_addr().unwrap(), b"last");
        let mut sent = Sent::default();
        send(&sender(), &mut batch, &mut sent);
        assert_eq!((sent.sent, sent.dropped, sent.failed), (2, 0, 1));
        assert_eq!(recv(&a), b"first");
        assert_eq!(recv(&a), b"last");
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_less_waits_for_the_task() {
        let a = receiver();
        a.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let to = a.local_addr().unwrap();
        let outbox = Outbox::new(sender());
        for i in 0..BATCH + 3 {
            assert_eq!(outbox.push(to, &[i as u8]), 0);
        }
        for i in 0..BATCH {
            assert_eq!(recv(&a), [i as u8]);
        }
        assert!(
            a.recv(&mut [0u8; 16]).is_err(),
            "only full batches go at once"
        );
        assert_eq!(outbox.waiting.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn the_sender_task_sends_what_is_left_in_order() {
        let a = receiver();
        let to = a.local_addr().unwrap();
        let outbox = std::sync::Arc::new(Outbox::new(sender()));
        let pusher = outbox.clone();
        // Pushed by a task woken in the same round as the sender task.
        let pushes = tokio::spawn(async move {
            for i in 0..10u8 {
                pusher.push(to, &[i]);
                tokio::task::yield_now().await;
            }
        });
        let mut total = 0;
        while total < 10 {
            total += outbox.send_when_ready().await.sent;
        }
        pushes.await.unwrap();
        for i in 0..10u8 {
            assert_eq!(recv(&a), [i]);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn drivers_on_several_threads_lose_nothing_and_keep_their_order() {
        const DRIVERS: u8 = 4;
        // Few enough to fit the receiver's socket buffer unread.
        const EACH: u16 = 50;
        let a = receiver();
        let to = a.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            (0..DRIVERS as usize * EACH as usize)
                .map(|_| recv(&a))
                .collect::<Vec<_>>()
        });
        let outbox = std::sync::Arc::new(Outbox::new(sender()));
        let task = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                loop {
                    outbox.send_when_ready().await;
                }
            })
        };
        let drivers: Vec<_> = (0..DRIVERS)
            .map(|d| {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    for n in 0..EACH {
                        let [hi, lo] = n.to_be_bytes();
                        assert_eq!(outbox.push(to, &[d, hi, lo]), 0);
                        if n % 8 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for d in drivers {
            d.await.unwrap();
        }
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        task.abort();
        let mut next = [0u16; DRIVERS as usize];
        for datagram in got {
            let d = datagram[0] as usize;
            assert_eq!(u16::from_be_bytes([datagram[1], datagram[2]]), next[d]);
            next[d] += 1;
        }
        assert_eq!(next, [EACH; DRIVERS as usize]);
    }

    #[test]
    fn while_a_batch_is_being_sent_what_waits_is_bounded() {
        let outbox = Outbox::new(sender());
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let sending = outbox.sending.lock().unwrap();
        let big = vec![0u8; 1200];
        let mut queued = 0;
        while outbox.push(to, &big) == 0 {
            queued += 1;
        }
        assert_eq!(queued, MAX_WAITING / 1200);
        drop(sending);
        // The next full batch's sender sends it all.
        let mut batch = outbox.sending.lock().unwrap();
        assert_eq!(outbox.send_waiting(&mut batch).sent, queued as u64);
        assert_eq!(outbox.push(to, &big), 0);
    }
}
