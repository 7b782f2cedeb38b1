//! Placing each stream's RTP timestamps on the recording's timeline.
//!
//! A stream is anchored where its first packet arrived; from there its own
//! RTP clock counts, so it neither drifts against itself nor jitters with
//! the network. A participant's video is then re-anchored against their
//! audio from the RTCP sender reports (both carry the same sender wallclock),
//! which is what keeps their lips in sync with their voice.

/// RTP timestamps unwrapped to 64 bits.
#[derive(Default, Clone, Copy)]
pub struct Unwrap {
    last: Option<u64>,
}

impl Unwrap {
    pub fn extend(&mut self, ts: u32) -> u64 {
        let Some(last) = self.last else {
            let e = (1u64 << 32) + ts as u64;
            self.last = Some(e);
            return e;
        };
        let base = last & !0xffff_ffff;
        let e = [base.wrapping_sub(1 << 32), base, base + (1 << 32)]
            .into_iter()
            .map(|b| b + ts as u64)
            .min_by_key(|e| e.abs_diff(last))
            .expect("three candidates");
        if e > last {
            self.last = Some(e);
        }
        e
    }
}

/// One stream's mapping from RTP time to timeline microseconds.
#[derive(Clone, Copy)]
pub struct Clock {
    rate: u32,
    unwrap: Unwrap,
    /// (extended RTP timestamp, timeline µs) of the anchor.
    anchor: Option<(u64, i64)>,
}

impl Clock {
    pub fn new(rate: u32) -> Clock {
        Clock {
            rate: rate.max(1),
            unwrap: Unwrap::default(),
            anchor: None,
        }
    }

    pub fn is_anchored(&self) -> bool {
        self.anchor.is_some()
    }

    /// Timeline µs of RTP timestamp `ts`; the first call anchors the clock
    /// at `arrival_us`.
    pub fn at(&mut self, ts: u32, arrival_us: i64) -> i64 {
        let e = self.unwrap.extend(ts);
        let (ats, aus) = *self.anchor.get_or_insert((e, arrival_us));
        aus + (e as i128 - ats as i128) as i64 * 1_000_000 / self.rate as i64
    }

    /// Timeline µs of `ts` without unwrapping state changes (for reports).
    fn peek(&self, ts: u32) -> Option<i64> {
        let (ats, aus) = self.anchor?;
        // Nearest wrap of `ts` to the anchor.
        let base = ats & !0xffff_ffff;
        let e = [base.wrapping_sub(1 << 32), base, base + (1 << 32)]
            .into_iter()
            .map(|b| b + ts as u64)
            .min_by_key(|e| e.abs_diff(ats))?;
        Some(aus + (e as i128 - ats as i128) as i64 * 1_000_000 / self.rate as i64)
    }

    /// Moves the anchor so that `ts` falls at `timeline_us`.
    fn reanchor(&mut self, ts: u32, timeline_us: i64) {
        if let (Some(now), Some((ats, aus))) = (self.peek(ts), self.anchor) {
            self.anchor = Some((ats, aus + timeline_us - now));
        }
    }
}

/// Seconds in 64-bit NTP format.
pub fn ntp_seconds(ntp: u64) -> f64 {
    (ntp >> 32) as f64 + (ntp & 0xffff_ffff) as f64 / 4_294_967_296.0
}

/// The latest sender report of a stream: (NTP seconds, RTP timestamp).
pub type Report = (f64, u32);

/// Lines a participant's video clock up with their audio clock, given one
/// sender report of each. Returns how far the video moved, in µs.
pub fn sync_video_to_audio(
    audio: &Clock,
    audio_sr: Report,
    video: &mut Clock,
    video_sr: Report,
) -> Option<i64> {
    // The audio RTP time at the instant of the video report...
    let dt = video_sr.0 - audio_sr.0;
    let audio_ts = (audio_sr.1 as i64 + (dt * audio.rate as f64).round() as i64) as u32;
    // ...is where the video report's RTP time belongs on the timeline.
    let want = audio.peek(audio_ts)?;
    let have = video.peek(video_sr.1)?;
    video.reanchor(video_sr.1, want);
    Some(want - have)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_counts_rtp_time_from_the_first_arrival_across_a_wrap() {
        let mut c = Clock::new(48_000);
        assert_eq!(c.at(u32::MAX - 479, 1_000_000), 1_000_000);
        // 960 ticks later (20 ms), across the wrap; arrival time is ignored.
        assert_eq!(c.at(480, 5_000_000), 1_020_000);
    }

    #[test]
    fn video_follows_audio_by_sender_reports() {
        // Audio anchored at 0 with ts 1000. Video's first packet arrived
        // 80 ms after the matching audio (network), so arrival anchoring
        // puts it 80 ms late.
        let mut audio = Clock::new(48_000);
        let mut video = Clock::new(90_000);
        audio.at(1000, 0);
        video.at(50_000, 80_000);
        // Reports: at sender time 100.0 s audio was at ts 1000, and at 100.5 s
        // video was at ts 50_000 + 45_000 (0.5 s later, so ts 50_000 was 100.0 s).
        let moved =
            sync_video_to_audio(&audio, (100.0, 1000), &mut video, (100.5, 95_000)).unwrap();
        assert_eq!(moved, -80_000);
        assert_eq!(video.at(50_000, 0), 0);
        assert_eq!(video.at(95_000, 0), 500_000);
    }
}
