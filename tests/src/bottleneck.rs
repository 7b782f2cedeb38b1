//! A slow last hop, for tests of the SFU's bandwidth estimation: an
//! interceptor that lets what a client receives through at a bit rate,
//! queueing the rest as a router's buffer would (packets arrive later and
//! later) and dropping what would wait longer than the buffer holds.
//!
//! It sits next to the wire, so the client's congestion feedback reports the
//! times packets came out of the queue, as a browser behind a slow link does.

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::marshal::MarshalSize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct Bottleneck {
    /// The link's rate, which the test may change while it runs.
    bits_per_second: Arc<AtomicU64>,
    /// Longest a packet may queue; later ones are dropped.
    buffer: Duration,
    /// When the link has sent everything queued so far.
    free_at: Option<Instant>,
    /// Packets in the queue, each with its `now` set to when it leaves it.
    queued: VecDeque<TaggedPacket>,
    out: VecDeque<TaggedPacket>,
    dropped: Arc<AtomicUsize>,
    write_queue: VecDeque<TaggedPacket>,
}

impl Bottleneck {
    /// A link of `bits_per_second` with a buffer of `buffer`; `dropped`
    /// counts what did not fit.
    pub fn new(
        bits_per_second: Arc<AtomicU64>,
        buffer: Duration,
        dropped: Arc<AtomicUsize>,
    ) -> Bottleneck {
        Bottleneck {
            bits_per_second,
            buffer,
            free_at: None,
            queued: VecDeque::new(),
            out: VecDeque::new(),
            dropped,
            write_queue: VecDeque::new(),
        }
    }

    fn release(&mut self, now: Instant) {
        while self.queued.front().is_some_and(|p| p.now <= now) {
            self.out.extend(self.queued.pop_front());
        }
    }
}

fn size(packet: &Packet) -> usize {
    // IP and UDP headers, SRTP tag: about 40 bytes on top.
    40 + match packet {
        Packet::Rtp(p) => p.header.marshal_size() + p.payload.len(),
        Packet::Rtcp(ps) => ps.iter().map(|p| p.marshal_size()).sum(),
        _ => 0,
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for Bottleneck {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        let now = msg.now;
        self.release(now);
        let start = self.free_at.map_or(now, |f| f.max(now));
        let bits = size(&msg.message.packet) as u64 * 8;
        let rate = self.bits_per_second.load(Ordering::Relaxed).max(1);
        let done = start + Duration::from_micros(bits * 1_000_000 / rate);
        if done.saturating_duration_since(now) > self.buffer {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.free_at = Some(done);
        msg.now = done;
        self.queued.push_back(msg);
        self.release(now);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.out.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write_queue.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.release(now);
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.queued.front().map(|p| p.now)
    }
}

impl Interceptor for Bottleneck {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
