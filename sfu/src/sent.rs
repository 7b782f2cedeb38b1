//! What a downlink sent lately, by transport-wide sequence number, for
//! reading the client's congestion feedback against.
//!
//! A ring indexed by the sequence number: recording a packet and finding it
//! again are an index each, where webrtc's history keeps three hash maps
//! (in a profile of the downlink, 5 % of the server's time went to them).
//! Sequence numbers are counted here in 64 bits so that order survives the
//! 16-bit wrap; feedback names the low 16 bits.

use rtc::interceptor::{Acknowledgement, PacketReport};
use std::time::{Duration, Instant};

/// Packets remembered: about a second of a busy receiver's traffic, more
/// than feedback (every 50–100 ms) ever lags.
const SLOTS: usize = 2048;

#[derive(Clone, Copy)]
struct Sent {
    /// The 64-bit sequence number; `u64::MAX` for an empty slot.
    seq: u64,
    ssrc: u32,
    rtp_seq: u16,
    size: u16,
    departure: Instant,
    arrived: bool,
    arrival: Option<Duration>,
}

pub(crate) struct SendHistory {
    slots: Box<[Sent]>,
    /// One past the highest sequence number recorded.
    end: u64,
    /// The next to report, and the highest reported as arrived.
    next_to_report: u64,
    highest_arrived: Option<u64>,
}

impl SendHistory {
    pub(crate) fn new(now: Instant) -> Self {
        let empty = Sent {
            seq: u64::MAX,
            ssrc: 0,
            rtp_seq: 0,
            size: 0,
            departure: now,
            arrived: false,
            arrival: None,
        };
        SendHistory {
            slots: vec![empty; SLOTS].into_boxed_slice(),
            end: 0,
            next_to_report: 0,
            highest_arrived: None,
        }
    }

    /// Records packet `seq` (64-bit) as it leaves.
    pub(crate) fn record(&mut self, seq: u64, ssrc: u32, rtp_seq: u16, size: usize, now: Instant) {
        self.slots[seq as usize % SLOTS] = Sent {
            seq,
            ssrc,
            rtp_seq,
            size: size.min(u16::MAX as usize) as u16,
            departure: now,
            arrived: false,
            arrival: None,
        };
        self.end = self.end.max(seq + 1);
        // What fell out of the ring can no longer be reported.
        self.next_to_report = self
            .next_to_report
            .max(self.end.saturating_sub(SLOTS as u64));
    }

    /// What the client said of one packet.
    pub(crate) fn acknowledge(&mut self, ack: &Acknowledgement) {
        // The latest 64-bit number whose low 16 bits are the ack's.
        let Some(last) = self.end.checked_sub(1) else {
            return;
        };
        let back = (last as u16).wrapping_sub(ack.sequence_number) as u64;
        let Some(seq) = last.checked_sub(back) else {
            return;
        };
        let slot = &mut self.slots[seq as usize % SLOTS];
        if slot.seq != seq {
            return;
        }
        slot.arrived = ack.arrived;
        slot.arrival = ack.arrival;
        if ack.arrived {
            self.highest_arrived = Some(self.highest_arrived.map_or(seq, |h| h.max(seq)));
        }
    }

    /// Every packet up to the highest reported as arrived, in send order,
    /// once: those not reported by then count as lost.
    pub(crate) fn take_reports(&mut self) -> Vec<PacketReport> {
        let Some(highest) = self.highest_arrived else {
            return Vec::new();
        };
        let mut reports = Vec::new();
        for seq in self.next_to_report..=highest {
            let s = self.slots[seq as usize % SLOTS];
            if s.seq != seq {
                continue;
            }
            reports.push(PacketReport {
                ssrc: s.ssrc,
                id: seq,
                rtp_sequence_number: s.rtp_seq,
                is_twcc: true,
                twcc_sequence_number: seq as u16,
                size: usize::from(s.size),
                arrived: s.arrived,
                departure: s.departure,
                arrival: s.arrival,
                ecn: Default::default(),
            });
        }
        self.next_to_report = self.next_to_report.max(highest + 1);
        reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u16, arrived: bool, at_ms: u64) -> Acknowledgement {
        Acknowledgement {
            sequence_number: seq,
            arrived,
            arrival: arrived.then(|| Duration::from_millis(at_ms)),
            ecn: Default::default(),
        }
    }

    #[test]
    fn reports_come_in_send_order_once_with_losses_across_the_wrap() {
        let start = Instant::now();
        let mut h = SendHistory::new(start);
        // Sequence numbers 65534, 65535, 0, 1, 2 on the wire.
        let first = 65534u64;
        for i in 0..5 {
            h.record(first + i, 7, i as u16, 1000 + i as usize, start);
        }
        assert!(h.take_reports().is_empty(), "nothing acknowledged yet");
        h.acknowledge(&ack(65534, true, 10));
        h.acknowledge(&ack(65535, false, 0));
        h.acknowledge(&ack(1, true, 12));
        let reports = h.take_reports();
        let seen: Vec<(u16, bool)> = reports
            .iter()
            .map(|r| (r.twcc_sequence_number, r.arrived))
            .collect();
        // 0 was never reported: lost, as 65535 said it was.
        assert_eq!(seen, [(65534, true), (65535, false), (0, false), (1, true)]);
        assert_eq!(reports[3].size, 1003);
        assert_eq!(reports[3].arrival, Some(Duration::from_millis(12)));
        assert!(h.take_reports().is_empty(), "each packet once");
        h.acknowledge(&ack(2, true, 13));
        assert_eq!(h.take_reports().len(), 1);
    }

    #[test]
    fn feedback_for_packets_long_gone_or_never_sent_is_ignored() {
        let start = Instant::now();
        let mut h = SendHistory::new(start);
        h.acknowledge(&ack(3, true, 1));
        assert!(h.take_reports().is_empty());
        for seq in 0..(SLOTS as u64 + 10) {
            h.record(seq, 1, seq as u16, 100, start);
        }
        // Packet 5 was overwritten by SLOTS + 5: feedback on it is ignored.
        h.acknowledge(&ack(5, true, 1));
        assert!(h.take_reports().is_empty());
        h.acknowledge(&ack((SLOTS + 5) as u16, true, 1));
        let reports = h.take_reports();
        // From the oldest the ring still holds, up to the one acknowledged.
        assert_eq!(reports.first().unwrap().id, 10);
        assert_eq!(reports.last().unwrap().id, SLOTS as u64 + 5);
        assert!(reports.last().unwrap().arrived);
        assert_eq!(reports.len(), SLOTS - 4);
    }
}
