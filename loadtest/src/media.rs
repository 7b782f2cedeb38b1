//! What simulated participants send: RTP payloads shaped like Opus and VP8,
//! generated (never encoded), each ending in a [`Marker`] so a subscriber can
//! tell who sent it, which packet it is, and when it left.

use rand::Rng;
use rtc::rtp;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Bytes at the end of every payload.
pub const MARKER_LEN: usize = 24;
const MAGIC: [u8; 4] = *b"CLd1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Audio,
    Video,
}

/// The measurement trailer of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// Publisher's index in the whole run.
    pub publisher: u32,
    pub kind: Kind,
    /// Simulcast layer, 0 the smallest; 0 for a single stream.
    pub layer: u8,
    /// Per-stream packet counter, from 0.
    pub seq: u32,
    /// Microseconds since [`clock`]'s epoch when the packet was written.
    pub sent_us: u64,
}

impl Marker {
    pub fn write(&self, out: &mut [u8; MARKER_LEN]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&self.publisher.to_be_bytes());
        out[8..10].copy_from_slice(&(self.kind as u16).to_be_bytes());
        out[10..12].copy_from_slice(&u16::from(self.layer).to_be_bytes());
        out[12..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent_us.to_be_bytes());
    }

    /// Reads the trailer of `payload`; `None` when it is not ours.
    pub fn read(payload: &[u8]) -> Option<Marker> {
        let t = payload.get(payload.len().checked_sub(MARKER_LEN)?..)?;
        if t[0..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        let kind = match u16::from_be_bytes([t[8], t[9]]) {
            0 => Kind::Audio,
            1 => Kind::Video,
            _ => return None,
        };
        let layer = u16::from_be_bytes([t[10], t[11]]);
        if layer >= u16::from(MAX_LAYERS) {
            return None;
        }
        Some(Marker {
            publisher: u32_at(4),
            kind,
            layer: layer as u8,
            seq: u32_at(12),
            sent_us: u64::from_be_bytes(t[16..24].try_into().ok()?),
        })
    }
}

/// The simulcast layers of a video sent with `--simulcast`, smallest first:
/// rid (as Confer maps them) and share of the video bitrate, about what a
/// browser sends for a 720p camera.
pub const LAYERS: [(&str, f64); 3] = [("q", 0.1), ("h", 0.3), ("f", 1.0)];
pub const MAX_LAYERS: u8 = LAYERS.len() as u8;

/// Microseconds since the first call in this process: the one clock that
/// senders and receivers share, since they all live in this process.
pub fn clock() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Opus at 20 ms per packet: a TOC byte for a 20 ms CELT fullband frame,
/// then about 32 kbit/s of bytes.
pub const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
pub const AUDIO_TS_STEP: u32 = 960;
const AUDIO_PAYLOAD: usize = 80 + MARKER_LEN;

/// The audio payload for packet `seq` (the marker is filled in at sending).
pub fn audio_payload() -> Vec<u8> {
    let mut p = vec![0u8; AUDIO_PAYLOAD];
    p[0] = 0xfc;
    rand::rng().fill(&mut p[1..AUDIO_PAYLOAD - MARKER_LEN]);
    p
}

/// VP8 frames at a target bitrate: keyframes several times the size of the
/// frames between them, sizes varying by ±20 % as a real encoder's do.
#[derive(Clone, Copy, Debug)]
pub struct VideoShape {
    pub bitrate_bps: u64,
    pub fps: u32,
    pub keyframe_every: Duration,
}

impl Default for VideoShape {
    fn default() -> Self {
        VideoShape {
            bitrate_bps: 1_200_000,
            fps: 30,
            keyframe_every: Duration::from_secs(3),
        }
    }
}

/// How much bigger a keyframe is than the frames between keyframes.
const KEYFRAME_RATIO: f64 = 6.0;
/// Payload bytes per RTP packet, as browsers packetize.
const MAX_PAYLOAD: usize = 1200;
const VP8_DESCRIPTOR: usize = 1;

impl VideoShape {
    pub fn frame_interval(&self) -> Duration {
        Duration::from_secs(1) / self.fps.max(1)
    }

    pub fn ts_step(&self) -> u32 {
        90_000 / self.fps.max(1)
    }

    fn frames_per_keyframe(&self) -> u64 {
        (self.keyframe_every.as_secs_f64() * self.fps as f64)
            .round()
            .max(1.0) as u64
    }

    /// Bytes of frame number `n` (frame 0 is a keyframe).
    pub fn frame_size(&self, n: u64, rng: &mut impl Rng) -> usize {
        let per_gop = self.frames_per_keyframe() as f64;
        let avg = self.bitrate_bps as f64 / 8.0 / self.fps.max(1) as f64;
        // avg * per_gop = delta * (per_gop - 1 + ratio)
        let delta = avg * per_gop / (per_gop - 1.0 + KEYFRAME_RATIO);
        let base = if self.is_keyframe(n) {
            delta * KEYFRAME_RATIO
        } else {
            delta
        };
        (base * rng.random_range(0.8..1.2)).max(MARKER_LEN as f64 + 16.0) as usize
    }

    pub fn is_keyframe(&self, n: u64) -> bool {
        n.is_multiple_of(self.frames_per_keyframe())
    }

    /// Splits a frame of `size` bytes into RTP payloads, each with a VP8
    /// payload descriptor, room left for the marker at the end.
    pub fn packetize(&self, size: usize, keyframe: bool, rng: &mut impl Rng) -> Vec<Vec<u8>> {
        let room = MAX_PAYLOAD - VP8_DESCRIPTOR - MARKER_LEN;
        let count = size.div_ceil(room).max(1);
        let per = size.div_ceil(count);
        (0..count)
            .map(|i| {
                let body = per.min(size - i * per).max(3);
                let mut p = vec![0u8; VP8_DESCRIPTOR + body + MARKER_LEN];
                rng.fill(&mut p[VP8_DESCRIPTOR..VP8_DESCRIPTOR + body]);
                if i == 0 {
                    // S bit: start of the frame's first partition.
                    p[0] = 0x10;
                    // VP8 frame tag: bit 0 clear marks a keyframe; show_frame set.
                    p[1] = if keyframe { 0x10 } else { 0x11 };
                }
                p
            })
            .collect()
    }
}

/// RFC 6464 audio levels (−dBov): ordinary speech, and the digital silence
/// of a muted microphone.
pub const SPEAKING_LEVEL: u8 = 30;
pub const SILENT_LEVEL: u8 = 127;

/// One published track's generated media, whatever carries it: the RTP
/// packets due at each tick, each stamped with its [`Marker`].
pub struct TrackSource {
    pub kind: Kind,
    layer: u8,
    publisher: u32,
    speaking: bool,
    ssrc: u32,
    payload_type: u8,
    rtp_seq: u16,
    timestamp: u32,
    counter: u32,
    frame: u64,
    // ThreadRng cannot cross an await.
    rng: rand::rngs::StdRng,
}

impl TrackSource {
    pub fn new(
        kind: Kind,
        (publisher, speaking): (u32, bool),
        ssrc: u32,
        payload_type: u8,
    ) -> TrackSource {
        TrackSource {
            kind,
            layer: 0,
            publisher,
            speaking,
            ssrc,
            payload_type,
            rtp_seq: rand::random(),
            timestamp: rand::random(),
            counter: 0,
            frame: 0,
            rng: <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng(),
        }
    }

    /// The same, as simulcast layer `layer` of a video.
    pub fn in_layer(self, layer: u8) -> TrackSource {
        TrackSource { layer, ..self }
    }

    /// Time between two ticks: one audio frame, or one video frame.
    pub fn interval(&self, video: &VideoShape) -> Duration {
        match self.kind {
            Kind::Audio => AUDIO_INTERVAL,
            Kind::Video => video.frame_interval(),
        }
    }

    /// The RFC 6464 level this track's audio carries: speech, or a muted
    /// microphone's silence.
    pub fn audio_level(&self) -> u8 {
        if self.speaking {
            SPEAKING_LEVEL
        } else {
            SILENT_LEVEL
        }
    }

    pub fn is_speaking(&self) -> bool {
        self.speaking
    }

    /// This tick's packets, in order; each gets its marker's time when it
    /// is [`Outgoing::stamped`].
    pub fn next_packets(&mut self, video: &VideoShape) -> Vec<Outgoing> {
        let (payloads, ts_step) = match self.kind {
            Kind::Audio => (vec![audio_payload()], AUDIO_TS_STEP),
            Kind::Video => {
                let key = video.is_keyframe(self.frame);
                let size = video.frame_size(self.frame, &mut self.rng);
                self.frame += 1;
                (video.packetize(size, key, &mut self.rng), video.ts_step())
            }
        };
        let last = payloads.len() - 1;
        let mut out = Vec::with_capacity(payloads.len());
        for (i, payload) in payloads.into_iter().enumerate() {
            let header = rtp::header::Header {
                version: 2,
                marker: self.kind == Kind::Video && i == last,
                payload_type: self.payload_type,
                sequence_number: self.rtp_seq,
                timestamp: self.timestamp,
                ssrc: self.ssrc,
                ..Default::default()
            };
            let marker = Marker {
                publisher: self.publisher,
                kind: self.kind,
                layer: self.layer,
                seq: self.counter,
                sent_us: 0,
            };
            out.push(Outgoing {
                header,
                payload,
                marker,
            });
            self.counter += 1;
            self.rtp_seq = self.rtp_seq.wrapping_add(1);
        }
        self.timestamp = self.timestamp.wrapping_add(ts_step);
        out
    }
}

/// One packet of a tick, not yet stamped.
pub struct Outgoing {
    header: rtp::header::Header,
    payload: Vec<u8>,
    marker: Marker,
}

impl Outgoing {
    /// Payload bytes, what the pacer counts.
    pub fn bytes(&self) -> usize {
        self.payload.len()
    }

    /// Its marker counter and the RTP packet, stamped now: latency counts
    /// from when the packet leaves, not from when its frame was made.
    pub fn stamped(self) -> (u32, rtp::Packet) {
        let Outgoing {
            header,
            mut payload,
            mut marker,
        } = self;
        marker.sent_us = clock();
        let at = payload.len() - MARKER_LEN;
        marker.write((&mut payload[at..]).try_into().expect("marker length"));
        let packet = rtp::Packet {
            header,
            payload: payload.into(),
        };
        (marker.seq, packet)
    }
}

/// Spreads a video's packets as a browser does. libwebrtc's pacer sends at
/// 2.5 times the target bitrate, a burst every 5 ms, so a keyframe six times
/// a frame's size leaves over tens of milliseconds; sent all at once, it
/// would queue in the server behind itself and inflate the latency tail
/// with bursts no browser makes. Audio is not paced (libwebrtc sends it
/// first).
pub struct Pacer {
    /// Bytes per second; infinite when not pacing.
    rate: f64,
    /// Most bytes sendable at once: one burst's worth.
    burst: f64,
    budget: f64,
    refilled: tokio::time::Instant,
}

/// libwebrtc's pacing factor and burst interval.
pub const PACING_FACTOR: f64 = 2.5;
pub const PACE_EVERY: Duration = Duration::from_millis(5);

impl Pacer {
    /// Pacing a video of `bits_per_second` in all (all its simulcast layers).
    pub fn new(bits_per_second: u64) -> Pacer {
        let rate = bits_per_second as f64 * PACING_FACTOR / 8.0;
        let burst = rate * PACE_EVERY.as_secs_f64();
        Pacer {
            rate,
            burst,
            budget: burst,
            refilled: tokio::time::Instant::now(),
        }
    }

    /// Sends everything at once (`--no-pacing`, and audio).
    pub fn unpaced() -> Pacer {
        Pacer {
            rate: f64::INFINITY,
            burst: f64::INFINITY,
            budget: f64::INFINITY,
            refilled: tokio::time::Instant::now(),
        }
    }

    /// What a source's frame clock does with ticks missed while a frame was
    /// still leaving. A paced video's frames queue behind a keyframe that
    /// takes longer than a frame and follow at the pacer's rate, as in a
    /// browser's queue. An unpaced source skips ahead instead, so that the
    /// generator's own hiccups never turn into bursts no browser makes.
    pub fn missed_ticks(&self) -> tokio::time::MissedTickBehavior {
        if self.rate.is_finite() {
            tokio::time::MissedTickBehavior::Burst
        } else {
            tokio::time::MissedTickBehavior::Delay
        }
    }

    /// Waits until a packet of `bytes` may leave. As libwebrtc's budget, a
    /// packet leaves while any budget is left, even if it overdraws it.
    pub async fn wait_for(&mut self, bytes: usize) {
        loop {
            let now = tokio::time::Instant::now();
            let earned = now.duration_since(self.refilled).as_secs_f64() * self.rate;
            self.budget = (self.budget + earned).min(self.burst);
            self.refilled = now;
            if self.budget > 0.0 {
                self.budget -= bytes as f64;
                return;
            }
            tokio::time::sleep(PACE_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_at_the_end_of_a_payload() {
        let m = Marker {
            publisher: 7,
            kind: Kind::Video,
            layer: 2,
            seq: 123_456,
            sent_us: 9_876_543_210,
        };
        let mut p = vec![1u8; 300];
        let at = p.len() - MARKER_LEN;
        m.write((&mut p[at..]).try_into().unwrap());
        assert_eq!(Marker::read(&p), Some(m));
        assert_eq!(Marker::read(&p[..20]), None);
        p[at] = b'X';
        assert_eq!(Marker::read(&p), None);
    }

    #[test]
    fn video_averages_its_bitrate_with_big_keyframes() {
        let shape = VideoShape::default();
        let mut rng = rand::rng();
        let frames = 30 * 30;
        let mut bytes = 0;
        let mut packets = 0;
        for n in 0..frames {
            let size = shape.frame_size(n, &mut rng);
            let ps = shape.packetize(size, shape.is_keyframe(n), &mut rng);
            assert!(ps.iter().all(|p| p.len() <= MAX_PAYLOAD));
            assert_eq!(ps[0][1] & 1, u8::from(!shape.is_keyframe(n)));
            bytes += size;
            packets += ps.len();
        }
        let bps = bytes as f64 * 8.0 / 30.0;
        assert!((bps / 1_200_000.0 - 1.0).abs() < 0.05, "{bps} bit/s");
        // 5 kB frames average four to five 1200-byte packets.
        assert!(packets > frames as usize * 4, "{packets}");
    }

    /// Sends a frame of `packets` packets of `size` bytes through `pacer`;
    /// returns when each left, in ms from the start (virtual time).
    async fn pace(pacer: &mut Pacer, packets: usize, size: usize) -> Vec<u64> {
        let start = tokio::time::Instant::now();
        let mut at = Vec::new();
        for _ in 0..packets {
            pacer.wait_for(size).await;
            at.push(start.elapsed().as_millis() as u64);
        }
        at
    }

    #[tokio::test(start_paused = true)]
    async fn a_keyframe_leaves_over_tens_of_milliseconds() {
        // 1.2 Mbit/s paced at 3 Mbit/s: 1875 bytes per 5 ms burst, so a
        // 30 kB keyframe of 25 packets takes about 75 ms: two packets in
        // the first burst (the second overdrawing), then one or two a burst.
        let mut pacer = Pacer::new(1_200_000);
        let at = pace(&mut pacer, 25, 1200).await;
        assert_eq!(&at[..2], &[0, 0]);
        assert!((70..=80).contains(&at[24]), "{at:?}");
        // Never more than the rate allows over any stretch.
        for (i, t) in at.iter().enumerate() {
            assert!(
                (i + 1) as f64 * 1200.0 <= 1875.0 * (*t as f64 / 5.0 + 2.0),
                "{at:?}"
            );
        }
        // An idle pacer saves one burst, no more: two packets now (1875
        // bytes, the second overdrawing), two more 5 ms later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = pace(&mut pacer, 5, 1200).await;
        assert_eq!(at, [0, 0, 5, 5, 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn unpaced_sends_everything_at_once() {
        let at = pace(&mut Pacer::unpaced(), 100, 1200).await;
        assert!(at.iter().all(|t| *t == 0));
    }
}
