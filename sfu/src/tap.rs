//! A room's published media as it arrives, for an in-process consumer (the
//! recorder). A tap sees every track's RTP with its arrival time, the
//! publishers' sender reports (for A/V sync), tracks coming and going, and
//! active-speaker changes.
//!
//! The tap is fed with `try_send`: a consumer that falls behind loses
//! packets (and sees the gaps in the sequence numbers), it never slows the
//! forwarding of the meeting.

use crate::track::TrackKind;
use rtc::rtp;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

#[derive(Debug)]
pub enum Tapped {
    /// A track is published (or was, when the tap started).
    Track(TapTrack),
    Rtp {
        track_id: Arc<str>,
        at: Instant,
        packet: rtp::Packet,
    },
    /// An RTCP sender report: `ntp` (64-bit NTP format) is the publisher's
    /// wallclock at RTP timestamp `rtp`.
    SenderReport {
        track_id: Arc<str>,
        ntp: u64,
        rtp: u32,
    },
    TrackEnded {
        track_id: Arc<str>,
    },
    Speaker {
        participant_id: Option<String>,
    },
}

#[derive(Clone, Debug)]
pub struct TapTrack {
    pub track_id: Arc<str>,
    pub participant_id: String,
    pub user_id: String,
    pub name: String,
    pub kind: TrackKind,
    /// Lower-case MIME type, e.g. `audio/opus`, `video/vp8`.
    pub codec: String,
    pub clock_rate: u32,
}

/// The sending half, shared by the room and its tracks.
pub type TapSender = mpsc::Sender<Tapped>;

/// Packets a tap may hold before newer ones are dropped: about two seconds
/// of a busy room.
pub const TAP_CAPACITY: usize = 8192;
