//! When each packet a client sent arrived, by its transport-wide sequence
//! number, told back as congestion feedback (draft-holmer-rmcat-transport-
//! wide-cc-extensions-01): the client's send-side estimate, and so its
//! bitrate and simulcast layers, rests on it.

use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
    PacketStatusChunk, RecvDelta, RunLengthChunk, StatusChunkTypeTcc, StatusVectorChunk,
    SymbolSizeTypeTcc, SymbolTypeTcc, TransportLayerCc,
};
use std::collections::BTreeMap;
use std::time::Instant;

/// Deltas are in 250 µs ticks; the reference time in 64 ms.
const TICK_US: i64 = 250;
const REFERENCE_TICKS: i64 = 64_000 / TICK_US;
/// Most packets one feedback covers; more wait for the next one.
const MAX_PER_FEEDBACK: u64 = 1000;
/// Arrivals kept while waiting for feedback; beyond, the oldest go.
const MAX_KEPT: usize = 4096;
/// Two-bit symbols, seven to a status-vector chunk.
const PER_CHUNK: usize = 7;

pub struct Arrivals {
    epoch: Instant,
    /// Extended sequence number → arrival, in ticks since `epoch`.
    arrived: BTreeMap<u64, i64>,
    /// The highest extended sequence number seen.
    highest: Option<u64>,
    /// The first sequence number the next feedback reports.
    next: Option<u64>,
    count: u8,
}

impl Arrivals {
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            arrived: BTreeMap::new(),
            highest: None,
            next: None,
            count: 0,
        }
    }

    /// Notes that the packet numbered `sequence` arrived `now`.
    pub fn record(&mut self, sequence: u16, now: Instant) {
        let extended = match self.highest {
            None => u64::from(sequence),
            Some(h) => {
                let ahead = sequence.wrapping_sub(h as u16);
                if ahead < 0x8000 {
                    h + u64::from(ahead)
                } else {
                    match h.checked_sub(u64::from(ahead.wrapping_neg())) {
                        Some(e) => e,
                        None => return,
                    }
                }
            }
        };
        if self.next.is_some_and(|n| extended < n) {
            // Reported missing already; the sender has moved on.
            return;
        }
        self.highest = Some(self.highest.map_or(extended, |h| h.max(extended)));
        self.next.get_or_insert(extended);
        let ticks = now.saturating_duration_since(self.epoch).as_micros() as i64 / TICK_US;
        self.arrived.entry(extended).or_insert(ticks);
        if self.arrived.len() > MAX_KEPT
            && let Some((&first, _)) = self.arrived.first_key_value()
        {
            self.arrived.remove(&first);
            self.next = self.arrived.first_key_value().map(|(k, _)| *k);
        }
    }

    /// Feedback on what arrived since the last, from `sender_ssrc` about
    /// the client's `media_ssrc`; `None` when nothing did.
    pub fn feedback(&mut self, sender_ssrc: u32, media_ssrc: u32) -> Option<TransportLayerCc> {
        let first = self.next?;
        let (&last_seen, _) = self.arrived.last_key_value()?;
        let last = last_seen.min(first + MAX_PER_FEEDBACK - 1);
        let first_arrival = *self.arrived.range(first..=last).next()?.1;
        // The reference is a whole number of 64 ms; deltas count from it.
        let reference = first_arrival.div_euclid(REFERENCE_TICKS);
        let mut previous = reference * REFERENCE_TICKS;
        let mut symbols = Vec::with_capacity((last - first + 1) as usize);
        let mut deltas = Vec::new();
        for sequence in first..=last {
            let Some(&at) = self.arrived.get(&sequence) else {
                symbols.push(SymbolTypeTcc::PacketNotReceived);
                continue;
            };
            let delta = at - previous;
            previous = at;
            let symbol = if (0..=255).contains(&delta) {
                SymbolTypeTcc::PacketReceivedSmallDelta
            } else {
                SymbolTypeTcc::PacketReceivedLargeDelta
            };
            symbols.push(symbol);
            deltas.push(RecvDelta {
                type_tcc_packet: symbol,
                delta: delta.clamp(i64::from(i16::MIN), i64::from(i16::MAX)) * TICK_US,
            });
        }
        let full = symbols.len() / PER_CHUNK * PER_CHUNK;
        let mut chunks: Vec<PacketStatusChunk> = symbols[..full]
            .chunks(PER_CHUNK)
            .map(|c| {
                PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
                    type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
                    symbol_size: SymbolSizeTypeTcc::TwoBit,
                    symbol_list: c.to_vec(),
                })
            })
            .collect();
        // The rest as runs: a vector chunk padded to seven would tell of
        // packets past the end, which some readers take as lost.
        for run in symbols[full..].chunk_by(|a, b| a == b) {
            chunks.push(PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                packet_status_symbol: run[0],
                run_length: run.len() as u16,
            }));
        }
        let feedback = TransportLayerCc {
            sender_ssrc,
            media_ssrc,
            base_sequence_number: first as u16,
            packet_status_count: (last - first + 1) as u16,
            reference_time: (reference as u32) & 0x00ff_ffff,
            fb_pkt_count: self.count,
            packet_chunks: chunks,
            recv_deltas: deltas,
        };
        self.count = self.count.wrapping_add(1);
        self.next = Some(last + 1);
        self.arrived = self.arrived.split_off(&(last + 1));
        Some(feedback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::convert_twcc;
    use rtc::shared::marshal::{Marshal, Unmarshal};
    use std::time::Duration;

    /// Marshals and reads back, as the client would.
    fn round_trip(cc: &TransportLayerCc) -> TransportLayerCc {
        let bytes = cc.marshal().unwrap();
        TransportLayerCc::unmarshal(&mut &bytes[..]).unwrap()
    }

    #[test]
    fn arrivals_and_gaps_are_told_with_their_times() {
        let t = Instant::now();
        let mut a = Arrivals::new(t);
        // 65534, 65535, (0 lost), 1, then 2 arriving late after 3.
        a.record(65534, t + Duration::from_micros(1000));
        a.record(65535, t + Duration::from_micros(1500));
        a.record(1, t + Duration::from_millis(5));
        a.record(3, t + Duration::from_millis(90));
        a.record(2, t + Duration::from_millis(91));
        let cc = round_trip(&a.feedback(7, 9).unwrap());
        assert_eq!((cc.sender_ssrc, cc.media_ssrc), (7, 9));
        assert_eq!(cc.base_sequence_number, 65534);
        assert_eq!(cc.packet_status_count, 6);
        assert_eq!(cc.fb_pkt_count, 0);
        // webrtc-rs's own reading of it (as its send-side estimator would).
        let acks = convert_twcc(&cc);
        let arrived: Vec<(u16, bool)> = acks
            .iter()
            .map(|a| (a.sequence_number, a.arrived))
            .collect();
        assert_eq!(
            arrived,
            [
                (65534, true),
                (65535, true),
                (0, false),
                (1, true),
                (2, true),
                (3, true)
            ]
        );
        // Times from the reference (0 ms) on; 2 arrived after 3.
        let deltas: Vec<i64> = cc.recv_deltas.iter().map(|d| d.delta).collect();
        assert_eq!(deltas, [1000, 500, 3500, 86_000, -1000]);
        let at = |i: usize| acks[i].arrival.unwrap();
        assert_eq!(at(5) - at(3), Duration::from_millis(85));
        // The next feedback starts after these, numbered on.
        assert!(a.feedback(7, 9).is_none());
        a.record(4, t + Duration::from_millis(100));
        let next = a.feedback(7, 9).unwrap();
        assert_eq!(
            (next.base_sequence_number, next.packet_status_count),
            (4, 1)
        );
        assert_eq!(next.fb_pkt_count, 1);
        // Too late for the feedback that said it was lost: not told again.
        a.record(0, t + Duration::from_millis(101));
        assert!(a.feedback(7, 9).is_none());
    }

    #[test]
    fn a_long_run_is_split_across_feedbacks() {
        let t = Instant::now();
        let mut a = Arrivals::new(t);
        for i in 0..1500u16 {
            a.record(i, t + Duration::from_micros(u64::from(i) * 300));
        }
        let first = round_trip(&a.feedback(1, 2).unwrap());
        assert_eq!(first.packet_status_count, 1000);
        let second = round_trip(&a.feedback(1, 2).unwrap());
        assert_eq!(
            (second.base_sequence_number, second.packet_status_count),
            (1000, 500)
        );
    }
}
