//! One incoming RTP stream (what a client publishes, per SSRC): its
//! sequence numbers extended, what went missing and is asked for again
//! (NACK, RFC 4585), and the reception report a sender adapts to (RFC 3550
//! §6.4).

use rtc::rtcp::reception_report::ReceptionReport;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Packets remembered as missing; a longer gap is a restart, not loss.
const MAX_MISSING: usize = 512;
/// A jump this far ahead is taken as the stream starting over (RFC 3550
/// A.1's MAX_DROPOUT), not as that many lost.
const MAX_DROPOUT: u16 = 3000;
/// A packet is asked for this many times at most…
const MAX_NACKS: u8 = 10;
/// …and not after this long: the sender keeps about a second (libwebrtc).
const GIVE_UP: Duration = Duration::from_millis(1000);
/// Asked again after this long, when no round trip is known.
const DEFAULT_RETRY: Duration = Duration::from_millis(100);

/// What became of an arriving packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next one, or after a gap.
    New,
    /// One that was missing: late, or retransmitted.
    Recovered,
    /// Seen already, or too old to tell: not to be forwarded twice.
    Duplicate,
}

struct Missing {
    sequence: u64,
    since: Instant,
    asked: u8,
    last_asked: Option<Instant>,
}

pub struct InStream {
    ssrc: u32,
    clock_rate: u32,
    /// Whether its sender retransmits (RTX or plain NACK answered).
    nack: bool,
    /// Extended (with wrap count) sequence numbers: the first and highest.
    base: u64,
    highest: Option<u64>,
    received: u64,
    /// Expected and received at the last report, for its fraction lost.
    expected_prior: u64,
    received_prior: u64,
    missing: VecDeque<Missing>,
    /// Interarrival jitter (RFC 3550 §6.4.1) in RTP units, and the last
    /// transit time it was computed from.
    jitter: f64,
    transit: Option<i64>,
    epoch: Instant,
    /// The middle 32 bits of the last sender report's NTP time, and when it came.
    last_sr: Option<(u32, Instant)>,
}

impl InStream {
    pub fn new(ssrc: u32, clock_rate: u32, nack: bool, now: Instant) -> Self {
        Self {
            ssrc,
            clock_rate: clock_rate.max(1),
            nack,
            base: 0,
            highest: None,
            received: 0,
            expected_prior: 0,
            received_prior: 0,
            missing: VecDeque::new(),
            jitter: 0.0,
            transit: None,
            epoch: now,
            last_sr: None,
        }
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Notes a packet's arrival (`repaired`: it came on RTX).
    pub fn receive(
        &mut self,
        sequence: u16,
        rtp_time: u32,
        now: Instant,
        repaired: bool,
    ) -> Arrival {
        let Some(highest) = self.highest else {
            self.highest = Some(u64::from(sequence));
            self.base = u64::from(sequence);
            self.received = 1;
            self.jitter(rtp_time, now);
            return Arrival::New;
        };
        let ahead = sequence.wrapping_sub(highest as u16);
        if ahead == 0 {
            return Arrival::Duplicate;
        }
        if ahead < 0x8000 {
            if ahead > MAX_DROPOUT {
                // Started over: forget what was missing, count afresh.
                self.restart(sequence);
                return Arrival::New;
            }
            let extended = highest + u64::from(ahead);
            if self.nack {
                for missed in highest + 1..extended {
                    if self.missing.len() == MAX_MISSING {
                        self.missing.pop_front();
                    }
                    self.missing.push_back(Missing {
                        sequence: missed,
                        since: now,
                        asked: 0,
                        last_asked: None,
                    });
                }
            }
            self.highest = Some(extended);
            self.received += 1;
            if !repaired {
                self.jitter(rtp_time, now);
            }
            return Arrival::New;
        }
        // Behind the highest: missing (late or repaired), or seen already.
        let behind = u64::from(highest as u16).wrapping_sub(u64::from(sequence)) & 0xffff;
        let Some(extended) = highest.checked_sub(behind) else {
            return Arrival::Duplicate;
        };
        if extended < self.base {
            return Arrival::Duplicate;
        }
        match self.missing.iter().position(|m| m.sequence == extended) {
            Some(i) => {
                self.missing.remove(i);
                self.received += 1;
                Arrival::Recovered
            }
            // Without NACK nothing is tracked as missing: a late packet
            // still counts once.
            None if !self.nack => {
                self.received += 1;
                Arrival::Recovered
            }
            None => Arrival::Duplicate,
        }
    }

    fn restart(&mut self, sequence: u16) {
        self.highest = Some(u64::from(sequence));
        self.base = u64::from(sequence);
        self.received = 1;
        self.expected_prior = 0;
        self.received_prior = 0;
        self.missing.clear();
        self.transit = None;
    }

    fn jitter(&mut self, rtp_time: u32, now: Instant) {
        let arrival = now.saturating_duration_since(self.epoch).as_micros() as i64
            * i64::from(self.clock_rate)
            / 1_000_000;
        let transit = arrival - i64::from(rtp_time);
        if let Some(last) = self.transit {
            // RTP time wraps at 2^32: the difference is taken in that ring.
            let d = (transit - last) as i32;
            let d = f64::from(d.unsigned_abs());
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.transit = Some(transit);
    }

    /// Notes a sender report's NTP time, for the next report's LSR/DLSR.
    pub fn sender_report(&mut self, ntp: u64, now: Instant) {
        self.last_sr = Some(((ntp >> 16) as u32, now));
    }

    /// Sequence numbers to ask for now: those missing and not asked for in
    /// the last `retry` (a round trip; `None`: 100 ms). Those asked for
    /// too often, or missing too long, are given up.
    pub fn nacks(&mut self, now: Instant, retry: Option<Duration>) -> Vec<u16> {
        let retry = retry.unwrap_or(DEFAULT_RETRY);
        self.missing
            .retain(|m| m.asked < MAX_NACKS && now.saturating_duration_since(m.since) < GIVE_UP);
        let mut due = Vec::new();
        for m in &mut self.missing {
            if m.last_asked
                .is_none_or(|t| now.saturating_duration_since(t) >= retry)
            {
                m.asked += 1;
                m.last_asked = Some(now);
                due.push(m.sequence as u16);
            }
        }
        due
    }

    /// The reception report on this stream since the last one.
    pub fn report(&mut self, now: Instant) -> Option<ReceptionReport> {
        let highest = self.highest?;
        let expected = highest - self.base + 1;
        let lost = expected.saturating_sub(self.received);
        let expected_interval = expected - self.expected_prior;
        let received_interval = self.received.saturating_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval.saturating_sub(received_interval);
        let fraction_lost = (lost_interval << 8)
            .checked_div(expected_interval)
            .map_or(0, |f| f.min(255) as u8);
        let (last_sender_report, delay) = match self.last_sr {
            Some((lsr, at)) => {
                let since = now.saturating_duration_since(at);
                (lsr, (since.as_secs_f64() * 65536.0) as u32)
            }
            None => (0, 0),
        };
        Some(ReceptionReport {
            ssrc: self.ssrc,
            fraction_lost,
            // 24 bits, signed; more lost than that saturates.
            total_lost: lost.min(0x7f_ffff) as u32,
            last_sequence_number: highest as u32,
            jitter: self.jitter as u32,
            last_sender_report,
            delay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn gaps_are_asked_for_again_until_they_come_or_are_given_up() {
        let t = Instant::now();
        let mut s = InStream::new(1, 90000, true, t);
        assert_eq!(s.receive(65534, 0, t, false), Arrival::New);
        assert_eq!(s.receive(65535, 0, t, false), Arrival::New);
        // 0, 1 and 2 missing across the wrap.
        assert_eq!(s.receive(3, 0, t, false), Arrival::New);
        assert_eq!(s.nacks(t, None), [0, 1, 2]);
        assert!(s.nacks(t + 50 * MS, None).is_empty());
        assert_eq!(s.receive(1, 0, t + 60 * MS, true), Arrival::Recovered);
        assert_eq!(s.receive(1, 0, t + 61 * MS, true), Arrival::Duplicate);
        assert_eq!(s.receive(3, 0, t + 61 * MS, false), Arrival::Duplicate);
        assert_eq!(s.nacks(t + 100 * MS, None), [0, 2]);
        assert_eq!(s.nacks(t + 130 * MS, Some(30 * MS)), [0, 2]);
        // Given up after a second.
        assert!(s.nacks(t + 1000 * MS, None).is_empty());
        assert_eq!(s.receive(0, 0, t + 1001 * MS, true), Arrival::Duplicate);

        let report = s.report(t).unwrap();
        assert_eq!(report.last_sequence_number, 65536 + 3);
        assert_eq!(report.total_lost, 2);
        // 6 expected, 4 received.
        assert_eq!(report.fraction_lost, (2 * 256 / 6) as u8);
        // Nothing since: nothing lost in this interval.
        assert_eq!(s.report(t).unwrap().fraction_lost, 0);
    }

    #[test]
    fn a_jump_far_ahead_is_a_restart_not_loss() {
        let t = Instant::now();
        let mut s = InStream::new(1, 48000, true, t);
        s.receive(100, 0, t, false);
        s.receive(100 + MAX_DROPOUT + 1, 0, t, false);
        assert!(s.nacks(t, None).is_empty());
        assert_eq!(s.report(t).unwrap().total_lost, 0);
    }

    #[test]
    fn without_nack_nothing_is_asked_for_and_late_packets_count() {
        let t = Instant::now();
        let mut s = InStream::new(1, 48000, false, t);
        s.receive(10, 0, t, false);
        s.receive(12, 1920, t, false);
        assert!(s.nacks(t, None).is_empty());
        assert_eq!(s.receive(11, 960, t, false), Arrival::Recovered);
        assert_eq!(s.report(t).unwrap().total_lost, 0);
    }

    #[test]
    fn jitter_follows_uneven_arrivals_and_the_report_answers_the_sender_report() {
        let t = Instant::now();
        let mut even = InStream::new(1, 90000, true, t);
        let mut uneven = InStream::new(2, 90000, true, t);
        for i in 0..50u16 {
            let rtp = u32::from(i) * 3000; // 30 fps
            even.receive(i, rtp, t + 33 * MS * u32::from(i), false);
            let wobble = if i % 2 == 0 { Duration::ZERO } else { 10 * MS };
            uneven.receive(i, rtp, t + 33 * MS * u32::from(i) + wobble, false);
        }
        let calm = even.report(t).unwrap().jitter;
        let shaky = uneven.report(t).unwrap().jitter;
        assert!(calm < 100 && shaky > 500, "{calm} vs {shaky}");

        even.sender_report(0x1234_5678_9abc_def0, t);
        let r = even.report(t + Duration::from_millis(500)).unwrap();
        assert_eq!(r.last_sender_report, 0x5678_9abc);
        assert_eq!(r.delay, 32768);
    }
}
