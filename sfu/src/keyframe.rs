//! Keyframe requests: receivers' PLI/FIR reach the publisher coalesced and
//! rate-limited, so ten receivers losing the same frame cost one keyframe.

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::sansio::Protocol;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Fewest time between two keyframe requests to one publisher.
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// What to do with a keyframe request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send a PLI now.
    SendNow,
    /// One is due at the end of the interval; the caller must arrange it.
    SendAt(Instant),
    /// Covered by a request already sent or scheduled.
    Coalesced,
}

/// Per-publisher-track limiter. Plain data: the caller supplies the clock.
#[derive(Debug, Default)]
pub struct Limiter {
    last_sent: Option<Instant>,
    scheduled: bool,
}

impl Limiter {
    pub fn request(&mut self, now: Instant) -> Decision {
        match self.last_sent {
            Some(last) if now.duration_since(last) < MIN_INTERVAL => {
                if self.scheduled {
                    Decision::Coalesced
                } else {
                    self.scheduled = true;
                    Decision::SendAt(last + MIN_INTERVAL)
                }
            }
            _ if self.scheduled => Decision::Coalesced,
            _ => {
                self.last_sent = Some(now);
                Decision::SendNow
            }
        }
    }

    /// The scheduled request went out.
    pub fn sent_scheduled(&mut self, now: Instant) {
        self.scheduled = false;
        self.last_sent = Some(now);
    }
}

pub fn is_keyframe_request(p: &dyn rtcp::Packet) -> bool {
    let any = p.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// Interceptor that hands receivers' PLI/FIR to the application (the default
/// chain consumes all inbound RTCP), so the SFU can relay them upstream; and
/// publishers' sender reports, which a recording needs for A/V sync.
#[derive(Default)]
pub struct KeyframeRequestTap {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet
            && packets.iter().any(|p| {
                is_keyframe_request(p.as_ref())
                    || p.as_any().is::<SenderReport>()
                    || p.as_any().is::<ReceiverReport>()
            })
        {
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for KeyframeRequestTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_within_interval_coalesce_into_one_scheduled() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        assert_eq!(l.request(t0), Decision::SendNow);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(l.request(t1), Decision::SendAt(t0 + MIN_INTERVAL));
        assert_eq!(l.request(t1), Decision::Coalesced);
        l.sent_scheduled(t0 + MIN_INTERVAL);
        assert_eq!(
            l.request(t0 + MIN_INTERVAL),
            Decision::SendAt(t0 + MIN_INTERVAL * 2)
        );
        let later = t0 + Duration::from_secs(5);
        l.sent_scheduled(later - Duration::from_secs(1));
        assert_eq!(l.request(later), Decision::SendNow);
    }
}
