//! Loss on the last hop, for tests of the SFU's NACK answers: an interceptor
//! that drops every n-th video packet a client receives, once. It sits next
//! to the wire, so the client's NACK generator sees the gap, asks the SFU,
//! and lets the resent copy through (on the same SSRC; RTX never passes here).
//! Or every n-th video packet it sends, for the SFU's own NACKs: the client
//! answers them from its send buffer, on RTX.

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

pub struct DropVideo {
    every: u32,
    /// Drops what the client sends rather than what it receives.
    sending: bool,
    seen: u32,
    video_ssrcs: HashSet<u32>,
    dropped: HashSet<(u32, u16)>,
    count: Arc<AtomicUsize>,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl DropVideo {
    /// Drops every `every`-th received video packet; `count` says how many.
    pub fn new(every: u32, count: Arc<AtomicUsize>) -> DropVideo {
        DropVideo {
            every,
            sending: false,
            seen: 0,
            video_ssrcs: HashSet::new(),
            dropped: HashSet::new(),
            count,
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        }
    }
}

impl DropVideo {
    /// Drops every `every`-th video packet the client sends, once.
    pub fn sent(every: u32, count: Arc<AtomicUsize>) -> DropVideo {
        DropVideo {
            sending: true,
            ..DropVideo::new(every, count)
        }
    }

    /// Whether `msg` is the one to lose now.
    fn loses(&mut self, msg: &TaggedPacket) -> bool {
        let Packet::Rtp(p) = &msg.message.packet else {
            return false;
        };
        if !self.video_ssrcs.contains(&p.header.ssrc) {
            return false;
        }
        let key = (p.header.ssrc, p.header.sequence_number);
        // A sequence number seen before is the resent copy: let it pass.
        if self.dropped.contains(&key) {
            return false;
        }
        self.seen += 1;
        if !self.seen.is_multiple_of(self.every) {
            return false;
        }
        self.dropped.insert(key);
        self.count.fetch_add(1, Ordering::Relaxed);
        true
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for DropVideo {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if !self.sending && self.loses(&msg) {
            return Ok(());
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if self.sending && self.loses(&msg) {
            return Ok(());
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for DropVideo {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        if self.sending && info.mime_type.to_ascii_lowercase().starts_with("video/") {
            self.video_ssrcs.insert(info.ssrc);
        }
    }
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        if self.sending {
            self.video_ssrcs.remove(&info.ssrc);
        }
    }
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        if !self.sending && info.mime_type.to_ascii_lowercase().starts_with("video/") {
            self.video_ssrcs.insert(info.ssrc);
        }
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.video_ssrcs.remove(&info.ssrc);
    }
}
