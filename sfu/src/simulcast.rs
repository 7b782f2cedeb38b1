//! Simulcast: a publisher sends its video at up to three sizes (layers),
//! each receiver gets one of them, and a receiver changes layer only at a
//! keyframe of the layer it changes to, so its decoder never sees a frame
//! that refers to a picture it does not have.
//!
//! A layer is known by its RTP stream id (`a=rid`): `q`, `h`, `f` (or `r0`,
//! `r1`, `r2`) name them from smallest to largest; other ids take the free
//! slots in the order they appear. A track without rids is one layer.
//!
//! [`KeepRidTags`] keeps publishers tagging their packets with the rid, which
//! the layers of a track are known by.

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::sansio::Protocol;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

pub const MAX_LAYERS: usize = 3;

/// A layer that sent nothing for this long is paused (the publisher's
/// bandwidth estimate dropped it, or its window is too small for it).
const PAUSED_AFTER_MS: u64 = 1000;

/// What receivers ask for; the SFU gives the nearest layer that flows, or
/// nothing for `Off` (a tile scrolled out of sight).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Low,
    Medium,
    High,
    Off,
}

/// The requested "layer" of a receiver that asked for nothing.
pub const OFF: u8 = u8::MAX;

impl Quality {
    pub fn layer(self) -> u8 {
        match self {
            Quality::Off => OFF,
            q => q as u8,
        }
    }

    pub fn of_layer(layer: u8) -> Quality {
        match layer {
            0 => Quality::Low,
            1 => Quality::Medium,
            OFF => Quality::Off,
            _ => Quality::High,
        }
    }
}

fn slot_of_rid(rid: &str) -> Option<usize> {
    match rid {
        "q" | "r0" => Some(0),
        "h" | "r1" => Some(1),
        "f" | "r2" => Some(2),
        _ => None,
    }
}

/// The layers of one published track. Written by its forwarding task
/// (streams opening, packets arriving), read lock-free by its receivers.
pub struct Layers {
    ssrc: [AtomicU32; MAX_LAYERS],
    /// When each layer last had a packet: ms after `epoch`, plus one (0:
    /// never).
    seen: [AtomicU64; MAX_LAYERS],
    epoch: Instant,
    simulcast: AtomicBool,
    /// Smoothed bit/s of each layer, from [`RateMeter`].
    rate: [AtomicU32; MAX_LAYERS],
}

impl Layers {
    /// A track whose first stream is `ssrc`, one layer until rids show up.
    pub fn new(ssrc: u32) -> Layers {
        Layers {
            ssrc: [AtomicU32::new(ssrc), AtomicU32::new(0), AtomicU32::new(0)],
            seen: Default::default(),
            epoch: Instant::now(),
            simulcast: AtomicBool::new(false),
            rate: Default::default(),
        }
    }

    /// A stream of the track opened: with a rid it is a simulcast layer.
    pub fn open(&self, ssrc: u32, rid: Option<&str>) {
        let Some(rid) = rid.filter(|r| !r.is_empty()) else {
            return;
        };
        if !self.simulcast.swap(true, Ordering::AcqRel) {
            // The first stream was recorded without knowing its layer.
            self.ssrc[0].store(0, Ordering::Release);
        }
        if self.layer(ssrc).is_some() {
            return;
        }
        let slot = slot_of_rid(rid)
            .filter(|&s| self.ssrc[s].load(Ordering::Acquire) == 0)
            .or_else(|| (0..MAX_LAYERS).find(|&s| self.ssrc[s].load(Ordering::Acquire) == 0));
        if let Some(s) = slot {
            self.ssrc[s].store(ssrc, Ordering::Release);
        }
    }

    pub fn is_simulcast(&self) -> bool {
        self.simulcast.load(Ordering::Acquire)
    }

    /// The layer `ssrc` carries. Without simulcast every packet is layer 0.
    pub fn layer(&self, ssrc: u32) -> Option<u8> {
        if !self.is_simulcast() {
            return Some(0);
        }
        (0..MAX_LAYERS)
            .find(|&s| self.ssrc[s].load(Ordering::Acquire) == ssrc)
            .map(|s| s as u8)
    }

    pub fn ssrc(&self, layer: u8) -> u32 {
        self.ssrc
            .get(layer as usize)
            .map_or(0, |s| s.load(Ordering::Acquire))
    }

    pub fn saw(&self, layer: u8, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        if let Some(s) = self.seen.get(layer as usize) {
            s.store(ms, Ordering::Relaxed);
        }
    }

    /// Smoothed bit/s of each layer as the publisher sends it (0: none yet).
    pub fn rates(&self) -> [u32; MAX_LAYERS] {
        std::array::from_fn(|l| self.rate[l].load(Ordering::Relaxed))
    }

    /// Bit `n` set: layer `n` had a packet within the last second.
    pub fn flowing(&self, now: Instant) -> u8 {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64 + 1;
        (0..MAX_LAYERS).fold(0, |bits, s| {
            let seen = self.seen[s].load(Ordering::Relaxed);
            if seen != 0 && now_ms.saturating_sub(seen) < PAUSED_AFTER_MS {
                bits | 1 << s
            } else {
                bits
            }
        })
    }
}

/// Measures each layer's rate over half-second windows, for the bandwidth
/// allocation. Kept by the track's forwarding task: per packet it only adds.
#[derive(Default)]
pub struct RateMeter {
    bytes: [u64; MAX_LAYERS],
    since: Option<Instant>,
}

impl RateMeter {
    const WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

    /// Counts a packet of `bytes` (payload) on `layer`, and publishes the
    /// rates to `layers` when a window is over.
    pub fn add(&mut self, layers: &Layers, layer: u8, bytes: usize, now: Instant) {
        // The RTP header, its extensions and the SRTP tag: about 30 bytes.
        self.bytes[layer as usize % MAX_LAYERS] += bytes as u64 + 30;
        let since = *self.since.get_or_insert(now);
        let span = now.saturating_duration_since(since);
        if span < Self::WINDOW {
            return;
        }
        for (l, bytes) in self.bytes.iter_mut().enumerate() {
            let bps = (*bytes * 8 * 1000 / span.as_millis() as u64).min(u32::MAX as u64) as u32;
            let old = layers.rate[l].load(Ordering::Relaxed);
            // Smoothed over about three windows: keyframes come in bursts.
            let new = if old == 0 {
                bps
            } else {
                ((old as u64 * 2 + bps as u64) / 3) as u32
            };
            layers.rate[l].store(new, Ordering::Relaxed);
            *bytes = 0;
        }
        self.since = Some(now);
    }
}

/// The layer to send a receiver that asked for `requested`: the largest
/// flowing one not above it, else the smallest flowing one.
pub fn target(requested: u8, flowing: u8) -> Option<u8> {
    if requested == OFF {
        return None;
    }
    (0..=requested.min(MAX_LAYERS as u8 - 1))
        .rev()
        .chain(requested + 1..MAX_LAYERS as u8)
        .find(|l| flowing & (1 << l) != 0)
}

/// A report's loss above which a receiver goes a layer down (10 %), and
/// below which it counts as calm (2 %); `fraction_lost` is out of 256.
const LOSSY: u8 = 26;
const CALM: u8 = 5;
/// Calm this long before trying a layer up again.
const CALM_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest layer a receiver's own reception allows: one layer below the
/// one it is on when a receiver report shows heavy loss, one layer more
/// after a calm spell. Plain data: the caller supplies reports and the clock.
#[derive(Clone, Copy, Debug)]
pub struct LossCeiling {
    ceiling: u8,
    calm_since: Option<Instant>,
}

impl Default for LossCeiling {
    fn default() -> Self {
        LossCeiling {
            ceiling: MAX_LAYERS as u8 - 1,
            calm_since: None,
        }
    }
}

impl LossCeiling {
    /// Takes one report about the stream, sent while on layer `current`;
    /// returns the ceiling.
    pub fn report(&mut self, fraction_lost: u8, current: Option<u8>, now: Instant) -> u8 {
        let top = MAX_LAYERS as u8 - 1;
        if fraction_lost > LOSSY {
            if let Some(c) = current {
                self.ceiling = self.ceiling.min(c.saturating_sub(1));
            }
            self.calm_since = None;
        } else if fraction_lost < CALM {
            let since = *self.calm_since.get_or_insert(now);
            if self.ceiling < top && now.duration_since(since) >= CALM_FOR {
                self.ceiling += 1;
                self.calm_since = Some(now);
            }
        } else {
            self.calm_since = None;
        }
        self.ceiling
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it: the layer the receiver is on.
    Forward,
    /// Send it: a keyframe of the target layer, which the receiver is on from now.
    Switch,
    /// Not for this receiver.
    Drop,
    /// Not yet: the receiver waits for a keyframe of this layer.
    NeedKeyframe,
}

/// One receiver's current layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Selector {
    current: Option<u8>,
}

impl Selector {
    pub fn current(&self) -> Option<u8> {
        self.current
    }

    /// Whether a packet of `layer` goes to the receiver whose target is
    /// `target`; `keyframe` is asked only when it decides a switch.
    pub fn admit(
        &mut self,
        layer: u8,
        target: Option<u8>,
        keyframe: impl FnOnce() -> bool,
    ) -> Verdict {
        if Some(layer) == self.current {
            return Verdict::Forward;
        }
        if Some(layer) != target {
            return Verdict::Drop;
        }
        if keyframe() {
            self.current = Some(layer);
            Verdict::Switch
        } else {
            Verdict::NeedKeyframe
        }
    }
}

/// Whether `payload` starts a keyframe, for the video codecs the SFU
/// forwards (RFC 7741 VP8, RFC 9628 VP9, RFC 6184 H.264).
pub fn starts_keyframe(mime_type: &str, payload: &[u8]) -> bool {
    if mime_type.eq_ignore_ascii_case("video/vp8") {
        vp8_keyframe(payload)
    } else if mime_type.eq_ignore_ascii_case("video/vp9") {
        vp9_keyframe(payload)
    } else if mime_type.eq_ignore_ascii_case("video/h264") {
        h264_keyframe(payload)
    } else {
        false
    }
}

fn vp8_keyframe(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    // Start of partition 0.
    if b0 & 0x10 == 0 || b0 & 0x07 != 0 {
        return false;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let Some(&x) = p.get(1) else {
            return false;
        };
        i = 2;
        if x & 0x80 != 0 {
            // Picture id: one byte, or two when its top bit is set.
            i += if p.get(2).is_some_and(|b| b & 0x80 != 0) {
                2
            } else {
                1
            };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID / KEYIDX
        }
    }
    // The VP8 frame header's inverse key-frame flag.
    p.get(i).is_some_and(|b| b & 0x01 == 0)
}

fn vp9_keyframe(p: &[u8]) -> bool {
    let Some(&b0) = p.first() else {
        return false;
    };
    let (picture_id, inter, layers, begins) = (
        b0 & 0x80 != 0,
        b0 & 0x40 != 0,
        b0 & 0x20 != 0,
        b0 & 0x08 != 0,
    );
    if inter || !begins {
        return false;
    }
    if !layers {
        return true;
    }
    let mut i = 1;
    if picture_id {
        i += if p.get(1).is_some_and(|b| b & 0x80 != 0) {
            2
        } else {
            1
        };
    }
    // Spatial layer 0 starts the picture.
    p.get(i).is_some_and(|b| (b >> 1) & 0x07 == 0)
}

fn h264_keyframe(p: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    let Some(&b0) = p.first() else {
        return false;
    };
    match b0 & 0x1f {
        IDR | SPS => true,
        // STAP-A: any aggregated unit.
        24 => {
            let mut i = 1;
            while i + 2 < p.len() {
                let size = u16::from_be_bytes([p[i], p[i + 1]]) as usize;
                if matches!(p[i + 2] & 0x1f, IDR | SPS) {
                    return true;
                }
                i += 2 + size;
            }
            false
        }
        // FU-A: the first fragment of an IDR slice.
        28 => p
            .get(1)
            .is_some_and(|&h| h & 0x80 != 0 && matches!(h & 0x1f, IDR | SPS)),
        _ => false,
    }
}

/// The rid header extension's URI (RFC 8852).
const RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";

/// Leaves rid-tagged streams out of the SFU's receiver reports.
///
/// Why: a browser tags a stream's packets with its rid only until a receiver
/// report acknowledges the stream, and webrtc-rs 0.21 forgets which SSRC
/// carries which rid whenever the remote description is set again (every
/// renegotiation, e.g. when someone joins). Untagged packets then belong
/// nowhere and are dropped. Without report blocks for those streams the
/// browser keeps tagging (about 4 bytes a packet), so each renegotiation is
/// healed by the next packet. The browser still gets transport-wide
/// congestion feedback for its bandwidth estimate; what it loses for those
/// streams is the round-trip time and loss fraction of the report blocks.
///
/// Sits wire-ward of the receiver-report generator on the way out, so it sees
/// the reports it makes, and sees incoming RTP before the application does.
#[derive(Default)]
pub struct KeepRidTags {
    /// Remote streams that negotiated the rid extension, with its id.
    rid_ext: HashMap<u32, u8>,
    /// Remote streams seen tagged with a rid.
    tagged: HashSet<u32>,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl KeepRidTags {
    fn saw_rtp(&mut self, pkt: &rtc::rtp::Packet) {
        let ssrc = pkt.header.ssrc;
        if self.tagged.contains(&ssrc) {
            return;
        }
        if let Some(&id) = self.rid_ext.get(&ssrc)
            && pkt.header.get_extension(id).is_some()
        {
            self.tagged.insert(ssrc);
        }
    }

    /// `packets` without report blocks about tagged streams.
    fn strip_reports(&self, packets: &mut [Box<dyn rtc::rtcp::Packet>]) {
        for p in packets.iter_mut() {
            let Some(rr) = p.as_any().downcast_ref::<ReceiverReport>() else {
                continue;
            };
            if !rr.reports.iter().any(|r| self.tagged.contains(&r.ssrc)) {
                continue;
            }
            let mut kept = rr.clone();
            kept.reports.retain(|r| !self.tagged.contains(&r.ssrc));
            *p = Box::new(kept);
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeepRidTags {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(pkt) = &msg.message.packet {
            self.saw_rtp(pkt);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if !self.tagged.is_empty()
            && let Packet::Rtcp(packets) = &mut msg.message.packet
        {
            self.strip_reports(packets);
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for KeepRidTags {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}

    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        let rid = info.rtp_header_extensions.iter().find(|e| e.uri == RID_URI);
        if let Some(ext) = rid
            && let Ok(id) = u8::try_from(ext.id)
        {
            self.rid_ext.insert(info.ssrc, id);
        }
    }

    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.rid_ext.remove(&info.ssrc);
        self.tagged.remove(&info.ssrc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rids_name_layers_and_a_plain_track_is_one_layer() {
        let plain = Layers::new(7);
        assert_eq!(plain.layer(7), Some(0));
        assert!(!plain.is_simulcast());

        let l = Layers::new(100);
        l.open(300, Some("f"));
        l.open(100, Some("q"));
        l.open(200, Some("h"));
        assert!(l.is_simulcast());
        assert_eq!(
            [l.layer(100), l.layer(200), l.layer(300)],
            [Some(0), Some(1), Some(2)]
        );
        assert_eq!(l.layer(999), None);
        assert_eq!(l.ssrc(2), 300);

        // Unknown names fill the free slots in order.
        let l = Layers::new(1);
        l.open(1, Some("a"));
        l.open(2, Some("b"));
        assert_eq!([l.layer(1), l.layer(2)], [Some(0), Some(1)]);
    }

    #[test]
    fn only_layers_with_recent_packets_flow() {
        let l = Layers::new(1);
        let t = Instant::now();
        l.saw(0, t);
        l.saw(2, t);
        assert_eq!(l.flowing(t + Duration::from_millis(500)), 0b101);
        l.saw(0, t + Duration::from_millis(1500));
        assert_eq!(l.flowing(t + Duration::from_millis(1600)), 0b001);
    }

    #[test]
    fn the_target_is_the_nearest_flowing_layer() {
        assert_eq!(target(2, 0b111), Some(2));
        assert_eq!(target(2, 0b011), Some(1)); // top paused
        assert_eq!(target(0, 0b110), Some(1)); // only larger ones flow
        assert_eq!(target(1, 0b101), Some(0));
        assert_eq!(target(1, 0), None);
        assert_eq!(target(Quality::Off.layer(), 0b111), None);
    }

    #[test]
    fn a_receiver_switches_only_at_a_keyframe_of_its_target() {
        let mut s = Selector::default();
        assert_eq!(s.admit(0, Some(0), || false), Verdict::NeedKeyframe);
        assert_eq!(s.admit(1, Some(0), || true), Verdict::Drop);
        assert_eq!(s.admit(0, Some(0), || true), Verdict::Switch);
        assert_eq!(s.admit(0, Some(0), || false), Verdict::Forward);
        // Asked for more: layer 0 carries on until layer 2 has a keyframe.
        assert_eq!(s.admit(2, Some(2), || false), Verdict::NeedKeyframe);
        assert_eq!(s.admit(0, Some(2), || false), Verdict::Forward);
        assert_eq!(s.admit(2, Some(2), || true), Verdict::Switch);
        assert_eq!(s.admit(0, Some(2), || true), Verdict::Drop);
        assert_eq!(s.current(), Some(2));
    }

    #[test]
    fn heavy_loss_lowers_the_ceiling_and_calm_raises_it_slowly() {
        let t = Instant::now();
        let s = |secs: u64| t + Duration::from_secs(secs);
        let mut c = LossCeiling::default();
        assert_eq!(c.report(0, Some(2), s(0)), 2);
        // 20 % lost on the top layer: one down; still lossy there: one more.
        assert_eq!(c.report(51, Some(2), s(1)), 1);
        assert_eq!(c.report(51, Some(2), s(2)), 1); // not switched yet
        assert_eq!(c.report(51, Some(1), s(3)), 0);
        // Moderate loss holds; calm for 10 s raises one layer, then 10 s more.
        assert_eq!(c.report(10, Some(0), s(4)), 0);
        assert_eq!(c.report(0, Some(0), s(5)), 0);
        assert_eq!(c.report(0, Some(0), s(14)), 0);
        assert_eq!(c.report(0, Some(0), s(15)), 1);
        assert_eq!(c.report(0, Some(1), s(20)), 1);
        assert_eq!(c.report(0, Some(1), s(25)), 2);
        assert_eq!(c.report(0, Some(2), s(60)), 2);
    }

    #[test]
    fn keyframes_are_recognised_per_codec() {
        // VP8: X=1, S=1; I=1 with a 15-bit picture id; then the frame header.
        assert!(starts_keyframe(
            "video/VP8",
            &[0x90, 0x80, 0x81, 0x23, 0x10]
        ));
        assert!(!starts_keyframe(
            "video/VP8",
            &[0x90, 0x80, 0x81, 0x23, 0x11]
        ));
        // Not the start of the frame.
        assert!(!starts_keyframe(
            "video/VP8",
            &[0x80, 0x80, 0x81, 0x23, 0x10]
        ));
        assert!(starts_keyframe(
            "video/vp8",
            &[0x10, 0x50, 0x2c, 0x00, 0x9d]
        ));
        // VP9: B=1, P=0; with L=1, spatial layer 0 only.
        assert!(starts_keyframe("video/VP9", &[0x08]));
        assert!(!starts_keyframe("video/VP9", &[0x48]));
        assert!(starts_keyframe("video/VP9", &[0xa8, 0x81, 0x02, 0x00]));
        assert!(!starts_keyframe("video/VP9", &[0xa8, 0x81, 0x02, 0x02]));
        // H.264: SPS alone, in a STAP-A, and an IDR's first FU-A fragment.
        assert!(starts_keyframe("video/H264", &[0x67, 0x42]));
        assert!(starts_keyframe(
            "video/H264",
            &[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x01, 0x68]
        ));
        assert!(starts_keyframe("video/H264", &[0x7c, 0x85, 0x00]));
        assert!(!starts_keyframe("video/H264", &[0x7c, 0x05, 0x00]));
        assert!(!starts_keyframe("video/H264", &[0x41, 0x9a]));
        assert!(!starts_keyframe("video/VP8", &[]));
    }
}
