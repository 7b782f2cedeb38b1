//! What subscribers measure: per received stream, loss and RFC 3550 jitter;
//! per packet, latency from the sender's write to the subscriber's read.

use crate::media::{Kind, Marker};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Totals every task bumps, read by the progress line and the CPU samples.
#[derive(Default)]
pub struct Counters {
    pub sent_packets: AtomicU64,
    pub received_packets: AtomicU64,
    pub received_bytes: AtomicU64,
    pub joined: AtomicU64,
    pub failed: AtomicU64,
    /// Videos the server paused for a subscriber whose link fit no layer
    /// (Confer's `video_paused`).
    pub paused_videos: AtomicU64,
}

impl Counters {
    pub fn add_received(&self, bytes: usize) {
        self.received_packets.fetch_add(1, Ordering::Relaxed);
        self.received_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// The last packet counter a publisher wrote per kind, so that loss counts
/// what was sent, including a lost tail. Stored plus one: 0 is "none yet".
#[derive(Default)]
pub struct Sent([AtomicU64; 2]);

impl Sent {
    pub fn record(&self, kind: Kind, seq: u32) {
        self.0[kind as usize].store(u64::from(seq) + 1, Ordering::Relaxed);
    }

    pub fn last(&self, kind: Kind) -> Option<u32> {
        let v = self.0[kind as usize].load(Ordering::Relaxed);
        (v > 0).then(|| (v - 1) as u32)
    }
}

/// One publisher's track as one subscriber receives it.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    pub first_seq: u32,
    pub highest_seq: u32,
    pub received: u64,
    /// RFC 3550 interarrival jitter, microseconds.
    pub jitter_us: f64,
    last_transit: Option<i64>,
}

/// Everything one subscriber measured.
#[derive(Debug, Default)]
pub struct Subscriber {
    /// [`crate::media::clock`] when it asked for a token.
    pub started_us: u64,
    pub first_media_us: Option<u64>,
    /// By publisher, kind and simulcast layer.
    pub streams: HashMap<(u32, Kind, u8), Stream>,
    /// (arrival, latency) in microseconds, for percentiles over a window.
    pub latencies: Vec<(u64, u32)>,
}

impl Subscriber {
    pub fn new(started_us: u64) -> Subscriber {
        Subscriber {
            started_us,
            ..Default::default()
        }
    }

    pub fn on_packet(&mut self, m: Marker, now_us: u64) {
        self.first_media_us.get_or_insert(now_us);
        let latency = now_us.saturating_sub(m.sent_us);
        self.latencies
            .push((now_us, latency.min(u32::MAX as u64) as u32));
        let s = self
            .streams
            .entry((m.publisher, m.kind, m.layer))
            .or_insert_with(|| Stream {
                first_seq: m.seq,
                highest_seq: m.seq,
                ..Default::default()
            });
        s.received += 1;
        s.highest_seq = s.highest_seq.max(m.seq);
        s.first_seq = s.first_seq.min(m.seq);
        let transit = now_us as i64 - m.sent_us as i64;
        if let Some(last) = s.last_transit {
            let d = (transit - last).abs() as f64;
            s.jitter_us += (d - s.jitter_us) / 16.0;
        }
        s.last_transit = Some(transit);
    }

    /// Join time: from asking for a token to the first media packet.
    pub fn join_us(&self) -> Option<u64> {
        self.first_media_us.map(|t| t - self.started_us)
    }
}

/// Packets a subscriber should have had from a stream and how many it did,
/// given the publisher's last written counter (`None`: use the highest seen).
pub fn expected_and_received(s: &Stream, last_sent: Option<u32>) -> (u64, u64) {
    let last = last_sent.unwrap_or(s.highest_seq).max(s.highest_seq);
    let expected = u64::from(last - s.first_seq) + 1;
    (expected, s.received.min(expected))
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(seq: u32, sent_us: u64) -> Marker {
        Marker {
            publisher: 1,
            kind: Kind::Audio,
            layer: 0,
            seq,
            sent_us,
        }
    }

    #[test]
    fn loss_counts_holes_and_a_lost_tail() {
        let mut sub = Subscriber::new(0);
        for seq in [10, 11, 13, 12, 15] {
            sub.on_packet(marker(seq, 1000 * seq as u64), 1000 * seq as u64 + 300);
        }
        let s = &sub.streams[&(1, Kind::Audio, 0)];
        assert_eq!(expected_and_received(s, None), (6, 5));
        assert_eq!(expected_and_received(s, Some(17)), (8, 5));
        assert_eq!(sub.join_us(), Some(10_300));
    }

    #[test]
    fn jitter_follows_rfc3550_and_is_zero_for_steady_transit() {
        let mut sub = Subscriber::new(0);
        for seq in 0..100 {
            sub.on_packet(marker(seq, seq as u64 * 20_000), seq as u64 * 20_000 + 500);
        }
        assert_eq!(sub.streams[&(1, Kind::Audio, 0)].jitter_us, 0.0);
        // Transit alternating by 1 ms converges on 1 ms of jitter.
        for seq in 100..400 {
            let extra = if seq % 2 == 0 { 1000 } else { 0 };
            sub.on_packet(
                marker(seq, seq as u64 * 20_000),
                seq as u64 * 20_000 + 500 + extra,
            );
        }
        let j = sub.streams[&(1, Kind::Audio, 0)].jitter_us;
        assert!((j - 1000.0).abs() < 1.0, "{j}");
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
