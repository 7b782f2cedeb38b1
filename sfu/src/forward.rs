//! What changes in an RTP packet on its way from a publisher to one receiver.
//!
//! Every receiver-side stream has its own SSRC, sequence space and timestamp
//! space. The publisher behind it may change (a publisher rejoins, a track is
//! replaced, later a simulcast layer switch); the receiver must see one
//! continuous stream so its jitter buffer and decoder carry on without a
//! renegotiation. Payload type and header-extension ids are whatever was
//! negotiated on each leg, so they are remapped too.
//!
//! This is plain data on purpose: the forwarding loop owns one `Rewriter` per
//! receiver and calls [`Rewriter::rewrite`] for each packet, with no locks and
//! no allocation.

use rtc::rtp;

/// Header extensions the SFU forwards end to end. Transport-level ones
/// (transport-wide sequence numbers, MID, RID, abs-send-time) are per leg and
/// are written by the receiver-side sender itself, so they are never copied.
pub const FORWARDED_EXTENSIONS: &[&str] = &[
    AUDIO_LEVEL_URI,
    "urn:3gpp:video-orientation",
    "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay",
];

/// RFC 6464 client-to-mixer audio level.
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Maps a publisher's extension id to the receiver's id for the same URI.
/// Index = publisher id (one- and two-byte ids fit in u8), value 0 = drop.
#[derive(Clone, Debug)]
pub struct ExtensionMap {
    to_receiver: [u8; 256],
}

impl ExtensionMap {
    /// Builds the map from both legs' negotiated `(uri, id)` pairs, keeping
    /// only [`FORWARDED_EXTENSIONS`].
    pub fn new<'a>(
        publisher: impl IntoIterator<Item = (&'a str, u16)>,
        receiver: impl IntoIterator<Item = (&'a str, u16)> + Clone,
    ) -> Self {
        let mut to_receiver = [0u8; 256];
        for (uri, pub_id) in publisher {
            if !FORWARDED_EXTENSIONS.contains(&uri) || pub_id == 0 || pub_id > 255 {
                continue;
            }
            if let Some((_, rx_id)) = receiver.clone().into_iter().find(|(u, _)| *u == uri)
                && (1..=255).contains(&rx_id)
            {
                to_receiver[pub_id as usize] = rx_id as u8;
            }
        }
        ExtensionMap { to_receiver }
    }

    /// A map that drops every extension.
    pub fn none() -> Self {
        ExtensionMap {
            to_receiver: [0u8; 256],
        }
    }

    fn map(&self, id: u8) -> Option<u8> {
        match self.to_receiver[id as usize] {
            0 => None,
            id => Some(id),
        }
    }
}

/// Per-receiver rewrite state for one outgoing stream.
#[derive(Clone, Debug)]
pub struct Rewriter {
    out_ssrc: u32,
    out_payload_type: u8,
    extensions: ExtensionMap,
    /// Source currently mapped onto this stream, with its offsets.
    source: Option<Source>,
    /// Highest sequence number and timestamp sent, for continuity on switch.
    last_out_seq: u16,
    last_out_ts: u32,
    started: bool,
    /// Ticks from the last timestamp sent to the next source's first.
    next_ts_gap: u32,
}

#[derive(Clone, Copy, Debug)]
struct Source {
    ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
    highest_in_seq: u16,
}

/// How far apart two timestamps are put when the source changes, in clock
/// ticks: one video frame at 90 kHz / 30 fps, or one 20 ms Opus frame at 48 kHz.
/// Close enough for a decoder not to stall, never zero so it is not a repeat.
const SWITCH_TS_GAP: u32 = 3000;

impl Rewriter {
    pub fn new(out_ssrc: u32, out_payload_type: u8, extensions: ExtensionMap) -> Self {
        Rewriter {
            out_ssrc,
            out_payload_type,
            extensions,
            source: None,
            last_out_seq: 0,
            last_out_ts: 0,
            started: false,
            next_ts_gap: SWITCH_TS_GAP,
        }
    }

    /// After a pause (what the receiver was not sent on purpose), the next
    /// packet continues right after the last one sent, so the receiver sees
    /// no loss to ask for, and its timestamp is `ts_gap` ticks (the time
    /// paused) later, so the receiver's jitter estimate does not see a
    /// packet seconds late.
    pub fn resume(&mut self, ts_gap: u32) {
        self.source = None;
        self.next_ts_gap = ts_gap.max(SWITCH_TS_GAP);
    }

    pub fn out_ssrc(&self) -> u32 {
        self.out_ssrc
    }

    /// `ts` of the current source `ssrc` as this receiver sees it.
    pub fn map_timestamp(&self, ssrc: u32, ts: u32) -> Option<u32> {
        let s = self.source.filter(|s| s.ssrc == ssrc)?;
        Some(ts.wrapping_add(s.ts_offset))
    }

    /// Rewrites `pkt` in place for this receiver. Returns true when the
    /// packet should be sent.
    pub fn rewrite(&mut self, pkt: &mut rtp::Packet) -> bool {
        let in_seq = pkt.header.sequence_number;
        let in_ts = pkt.header.timestamp;
        let src = match self.source {
            Some(s) if s.ssrc == pkt.header.ssrc => s,
            _ => {
                // New source: continue right after what the receiver last saw.
                let (seq_offset, ts_offset) = if self.started {
                    (
                        self.last_out_seq.wrapping_add(1).wrapping_sub(in_seq),
                        self.last_out_ts
                            .wrapping_add(std::mem::replace(&mut self.next_ts_gap, SWITCH_TS_GAP))
                            .wrapping_sub(in_ts),
                    )
                } else {
                    // First source: keep its numbering, nothing to be continuous with.
                    (0, 0)
                };
                let s = Source {
                    ssrc: pkt.header.ssrc,
                    seq_offset,
                    ts_offset,
                    highest_in_seq: in_seq,
                };
                self.source = Some(s);
                s
            }
        };
        // Reordered packets and retransmissions of the current source keep
        // their mapped numbers: the offsets are fixed per source.
        let out_seq = in_seq.wrapping_add(src.seq_offset);
        let out_ts = in_ts.wrapping_add(src.ts_offset);
        if let Some(s) = self.source.as_mut()
            && in_seq.wrapping_sub(s.highest_in_seq) < 0x8000
        {
            s.highest_in_seq = in_seq;
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
        }
        if !self.started {
            self.started = true;
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
        }
        pkt.header.ssrc = self.out_ssrc;
        pkt.header.sequence_number = out_seq;
        pkt.header.timestamp = out_ts;
        pkt.header.payload_type = self.out_payload_type;
        self.rewrite_extensions(pkt);
        true
    }

    fn rewrite_extensions(&self, pkt: &mut rtp::Packet) {
        let one_byte = pkt.header.extension_profile == rtp::header::EXTENSION_PROFILE_ONE_BYTE;
        let exts = &mut pkt.header.extensions;
        exts.retain_mut(|e| match self.extensions.map(e.id) {
            // One-byte headers carry ids 1-14 only.
            Some(id) if !one_byte || id <= 14 => {
                e.id = id;
                true
            }
            _ => false,
        });
        // The publisher's padding fitted its own, longer extension block;
        // marshalling pads to a 32-bit boundary by itself.
        pkt.header.extensions_padding = 0;
        if exts.is_empty() {
            pkt.header.extension = false;
        }
    }
}

/// A copy of `pkt` to rewrite for one receiver, with room for one more
/// header extension, so that a downlink's transport-wide sequence number
/// does not grow the vector again: one allocation per copy, not two.
pub fn copy_for_receiver(pkt: &rtp::Packet) -> rtp::Packet {
    let h = &pkt.header;
    let mut extensions = Vec::with_capacity(h.extensions.len() + 1);
    extensions.extend(h.extensions.iter().cloned());
    rtp::Packet {
        header: rtp::header::Header {
            version: h.version,
            padding: h.padding,
            extension: h.extension,
            marker: h.marker,
            payload_type: h.payload_type,
            sequence_number: h.sequence_number,
            timestamp: h.timestamp,
            ssrc: h.ssrc,
            csrc: h.csrc.clone(),
            extension_profile: h.extension_profile,
            extensions,
            extensions_padding: h.extensions_padding,
        },
        payload: pkt.payload.clone(),
    }
}

/// RFC 6464 level of digital silence: what a muted microphone sends.
pub const SILENT: u8 = 127;

/// Which of a room's microphones to forward, given each one's level
/// ([`follow_peak`], in dB, higher is louder) and whether it is forwarded
/// now: the `n`
/// loudest, where those already forwarded count [`LAST_N_MARGIN`] louder so
/// two similar background noises do not swap places every tick. Ties keep
/// the earlier one. `n == 0`: all of them.
pub fn loudest(tracks: &[(u32, bool)], n: usize) -> Vec<bool> {
    if n == 0 || tracks.len() <= n {
        return vec![true; tracks.len()];
    }
    let mut order: Vec<usize> = (0..tracks.len()).collect();
    let key = |i: usize| tracks[i].0 + if tracks[i].1 { LAST_N_MARGIN } else { 0 };
    order.sort_by_key(|&i| std::cmp::Reverse(key(i)));
    let mut out = vec![false; tracks.len()];
    for &i in &order[..n] {
        out[i] = true;
    }
    out
}

/// How much louder (in [`loudest`]'s units, dB) a microphone must be to
/// take the place of one being forwarded.
pub const LAST_N_MARGIN: u32 = 6;

/// The next value of a level follower that rises within a few packets and
/// falls over about 300 ms (16 packets), in 1/16 dB: someone who starts to
/// talk outranks background noise after 2–3 packets, and a pause between
/// words does not give their place away. `dbov` is the packet's RFC 6464
/// level.
pub fn follow_peak(peak: u32, dbov: u8) -> u32 {
    let sample = (127 - u32::from(dbov.min(127))) * 16;
    if sample > peak {
        (peak + sample).div_ceil(2)
    } else {
        (peak * 15 + sample) / 16
    }
}

/// Muted microphones still send 50 packets/s of digital silence; in a large
/// room that is most of the audio. Those packets are not forwarded, and the
/// ones after are renumbered so every receiver sees a contiguous sequence
/// with a timestamp jump, as after Opus DTX, rather than a loss.
#[derive(Clone, Copy, Debug, Default)]
pub struct SilenceFilter {
    dropped: u16,
}

impl SilenceFilter {
    /// Whether to forward `pkt` with the given audio level; renumbers it if so.
    pub fn admit(&mut self, pkt: &mut rtp::Packet, level: Option<u8>) -> bool {
        if level == Some(SILENT) {
            self.dropped = self.dropped.wrapping_add(1);
            return false;
        }
        pkt.header.sequence_number = pkt.header.sequence_number.wrapping_sub(self.dropped);
        true
    }
}

/// Reads the RFC 6464 level from an audio packet: 0 (loudest) to 127 dBov
/// below, with the voice-activity flag. None when the extension is absent.
pub fn audio_level(pkt: &rtp::Packet, ext_id: u8) -> Option<(u8, bool)> {
    if ext_id == 0 {
        return None;
    }
    let payload = pkt.header.get_extension(ext_id)?;
    let b = *payload.first()?;
    Some((b & 0x7f, b & 0x80 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn silence_is_dropped_and_what_follows_stays_contiguous() {
        let mut f = SilenceFilter::default();
        let mut out = Vec::new();
        // Speech, then a muted stretch across the sequence wrap, then speech.
        let levels = [30, 30, 127, 127, 127, 40, 127, 50];
        for (i, level) in levels.into_iter().enumerate() {
            let mut p = pkt(1, 65534u16.wrapping_add(i as u16), 960 * i as u32);
            if f.admit(&mut p, Some(level)) {
                out.push((p.header.sequence_number, p.header.timestamp));
            }
        }
        assert_eq!(
            out,
            vec![(65534, 0), (65535, 960), (0, 960 * 5), (1, 960 * 7)]
        );
        // Without the extension nothing is judged silent.
        let mut p = pkt(1, 7, 0);
        assert!(f.admit(&mut p, None));
    }

    fn pkt(ssrc: u32, seq: u16, ts: u32) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                ssrc,
                sequence_number: seq,
                timestamp: ts,
                payload_type: 96,
                ..Default::default()
            },
            payload: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn a_receivers_copy_is_the_packet_with_room_for_one_more_extension() {
        let mut p = pkt(7, 1000, 5000);
        p.header.marker = true;
        p.header.csrc = vec![9];
        p.header
            .set_extension(1, Bytes::from_static(&[0x90]))
            .unwrap();
        p.header
            .set_extension(4, Bytes::from_static(&[1, 2]))
            .unwrap();
        let copy = copy_for_receiver(&p);
        assert_eq!(copy, p);
        assert!(copy.header.extensions.capacity() > p.header.extensions.len());
    }

    #[test]
    fn first_source_keeps_numbers_but_gets_receiver_ssrc_and_pt() {
        let mut r = Rewriter::new(42, 100, ExtensionMap::none());
        let mut p = pkt(7, 1000, 5000);
        assert!(r.rewrite(&mut p));
        assert_eq!(
            (p.header.ssrc, p.header.sequence_number, p.header.timestamp),
            (42, 1000, 5000)
        );
        assert_eq!(p.header.payload_type, 100);
    }

    #[test]
    fn source_switch_continues_sequence_and_timestamp() {
        let mut r = Rewriter::new(42, 96, ExtensionMap::none());
        for i in 0..10u16 {
            let mut p = pkt(7, 65530u16.wrapping_add(i), 1000 + i as u32 * 3000);
            assert!(r.rewrite(&mut p));
        }
        let mut p = pkt(9, 17, 777_777);
        assert!(r.rewrite(&mut p));
        assert_eq!(p.header.sequence_number, 65530u16.wrapping_add(10));
        assert_eq!(p.header.timestamp, 1000 + 9 * 3000 + SWITCH_TS_GAP);
        let mut p = pkt(9, 18, 777_777 + 3000);
        assert!(r.rewrite(&mut p));
        assert_eq!(p.header.sequence_number, 65530u16.wrapping_add(11));
        assert_eq!(p.header.timestamp, 1000 + 9 * 3000 + SWITCH_TS_GAP + 3000);
    }

    #[test]
    fn after_a_pause_the_same_source_continues_without_a_gap() {
        let mut r = Rewriter::new(42, 96, ExtensionMap::none());
        let mut p = pkt(7, 100, 9000);
        assert!(r.rewrite(&mut p));
        // Five seconds of packets were not sent.
        r.resume(5 * 90_000);
        let mut p = pkt(7, 400, 9000 + 5 * 90_000 + 3000);
        assert!(r.rewrite(&mut p));
        assert_eq!(p.header.sequence_number, 101);
        assert_eq!(p.header.timestamp, 9000 + 5 * 90_000);
        let mut p = pkt(7, 401, 9000 + 5 * 90_000 + 6000);
        assert!(r.rewrite(&mut p));
        assert_eq!(p.header.sequence_number, 102);
        assert_eq!(p.header.timestamp, 9000 + 5 * 90_000 + 3000);
    }

    #[test]
    fn reordered_packet_keeps_its_place() {
        let mut r = Rewriter::new(1, 96, ExtensionMap::none());
        let mut a = pkt(7, 10, 0);
        let mut c = pkt(7, 12, 0);
        let mut b = pkt(7, 11, 0);
        r.rewrite(&mut a);
        r.rewrite(&mut c);
        r.rewrite(&mut b);
        assert_eq!(
            [
                a.header.sequence_number,
                b.header.sequence_number,
                c.header.sequence_number
            ],
            [10, 11, 12]
        );
    }

    #[test]
    fn extensions_are_remapped_or_dropped() {
        let map = ExtensionMap::new(
            [
                (AUDIO_LEVEL_URI, 1),
                ("urn:ietf:params:rtp-hdrext:sdes:mid", 4),
            ],
            [
                (AUDIO_LEVEL_URI, 10),
                ("urn:ietf:params:rtp-hdrext:sdes:mid", 3),
            ],
        );
        let mut r = Rewriter::new(1, 111, map);
        let mut p = pkt(7, 1, 0);
        p.header.extension = true;
        p.header.extension_profile = 0xBEDE;
        p.header
            .set_extension(1, Bytes::from_static(&[0x85]))
            .unwrap();
        p.header.set_extension(4, Bytes::from_static(b"0")).unwrap();
        r.rewrite(&mut p);
        assert_eq!(p.header.extensions.len(), 1);
        assert_eq!(p.header.extensions[0].id, 10);
        assert_eq!(audio_level(&p, 10), Some((5, true)));
    }

    #[test]
    fn rewritten_packet_marshals_to_what_it_says() {
        use rtc::shared::marshal::{Marshal, Unmarshal};
        let map = ExtensionMap::new([(AUDIO_LEVEL_URI, 1)], [(AUDIO_LEVEL_URI, 3)]);
        let mut r = Rewriter::new(1, 111, map);
        // As a browser sends it: several extensions, padded block.
        let wire = {
            let mut p = pkt(7, 1, 0);
            p.header
                .set_extension(1, Bytes::from_static(&[0x85]))
                .unwrap();
            p.header
                .set_extension(2, Bytes::from_static(&[1, 2, 3]))
                .unwrap();
            p.header.set_extension(4, Bytes::from_static(b"0")).unwrap();
            p.header
                .set_extension(5, Bytes::from_static(&[9, 9]))
                .unwrap();
            p.marshal().unwrap()
        };
        let mut p = rtp::Packet::unmarshal(&mut wire.clone()).unwrap();
        r.rewrite(&mut p);
        let out = p.marshal().unwrap();
        let back = rtp::Packet::unmarshal(&mut out.clone()).unwrap();
        assert_eq!(back.payload, Bytes::from_static(b"x"));
        assert_eq!(back.header.extensions.len(), 1);
        assert_eq!(audio_level(&back, 3), Some((5, true)));

        // With nothing left to forward, no extension block at all.
        let mut r = Rewriter::new(1, 111, ExtensionMap::none());
        let mut p = rtp::Packet::unmarshal(&mut wire.clone()).unwrap();
        r.rewrite(&mut p);
        let back = rtp::Packet::unmarshal(&mut p.marshal().unwrap()).unwrap();
        assert!(!back.header.extension);
        assert_eq!(back.payload, Bytes::from_static(b"x"));
    }

    #[test]
    fn the_peak_follower_rises_at_once_and_falls_slowly() {
        // Background noise at 70 dBov (57 dB above silence) for a while.
        let mut peak = 0;
        for _ in 0..100 {
            peak = follow_peak(peak, 70);
        }
        assert_eq!(peak / 16, 57);
        // Talking at 20 dBov: above noise + margin after 2 packets (40 ms).
        let mut talking = peak;
        for _ in 0..2 {
            talking = follow_peak(talking, 20);
        }
        assert!(talking / 16 > 57 + LAST_N_MARGIN, "{}", talking / 16);
        // A 100 ms pause (5 packets of silence) keeps it well above the noise.
        for _ in 0..20 {
            talking = follow_peak(talking, 20);
        }
        for _ in 0..5 {
            talking = follow_peak(talking, 127);
        }
        assert!(talking / 16 > 57 + LAST_N_MARGIN, "{}", talking / 16);
        // Silence for seconds brings it down to nothing.
        for _ in 0..300 {
            talking = follow_peak(talking, 127);
        }
        assert_eq!(talking / 16, 0);
    }

    #[test]
    fn the_loudest_microphones_are_forwarded_and_the_rest_wait() {
        // Fewer than n, or n = 0: everyone.
        assert_eq!(loudest(&[(10, false), (50, true)], 2), [true, true]);
        assert_eq!(loudest(&[(10, false), (50, true), (5, true)], 0), [true; 3]);
        // The two loudest of four.
        let got = loudest(&[(20, true), (90, true), (60, true), (70, true)], 2);
        assert_eq!(got, [false, true, false, true]);
        // A newcomer must be clearly louder to take a place: 3 dB more is
        // not enough, 10 dB is.
        let held = [(60, true), (63, false), (90, true)];
        assert_eq!(loudest(&held, 2), [true, false, true]);
        let taken = [(60, true), (70, false), (90, true)];
        assert_eq!(loudest(&taken, 2), [false, true, true]);
        // Equal: the earlier keeps it.
        assert_eq!(
            loudest(&[(40, false), (40, false), (40, false)], 1),
            [true, false, false]
        );
    }
}
