//! How much each receiver can take, and which layers fit in it.
//!
//! Every receiver's browser reports when our packets arrived (transport-wide
//! congestion control feedback). webrtc's congestion-control interceptor
//! collects those reports; [`Reporting`] turns them into the delay-based
//! estimate of Google Congestion Control and shares it with the room as an
//! [`Estimate`]. Loss is left to [`crate::simulcast::LossCeiling`], which
//! lowers one track by one layer: GCC's loss half would take a receiver on a
//! lossy radio link down to its floor, and every video off with it.
//!
//! Every [`ALLOCATE_EVERY`] the room hands each receiver's estimate to
//! [`allocate`], which picks for each video track it receives the largest
//! layer that fits, the active speaker first, or none at all.

use crate::simulcast::{MAX_LAYERS, OFF};
use rtc::interceptor::{
    BandwidthEstimator, OveruseDetector, PacketReport, RateCalculator, SlopeEstimator, Usage,
};
use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the room re-allocates.
pub const ALLOCATE_EVERY: Duration = Duration::from_millis(500);

/// Where the estimate starts, unpublished: a receiver has no limit until its
/// queue is first seen to grow (within a second or two on a slow link), and
/// then the estimate falls to what actually arrives.
const START_BPS: f64 = 10_000_000.0;
const MIN_BPS: f64 = 100_000.0;
const MAX_BPS: f64 = 50_000_000.0;

/// An upgrade past what a receiver already has must fit in this share of
/// its estimate, so that the estimate's wobble does not flip a layer (and
/// cost a keyframe) every half second.
const UPGRADE_HEADROOM: u64 = 85;
/// A video keeps its smallest layer while that fits in what the link was
/// seen to carry: the estimate after a growing queue is 85 % of that. So one
/// false alarm (a busy server's own queueing looks the same) does not pause
/// a single-layer video that the link carries; a link that is really too
/// slow for it still pauses it.
const KEEP_SMALLEST: u64 = 100 * 100 / 85;

/// Assumed rates of a layer that flows but has not been measured yet.
const GUESS_BPS: [u32; MAX_LAYERS] = [150_000, 500_000, 1_500_000];

/// A receiver's estimated downlink in bit/s, shared between its peer
/// connection's congestion controller and the room. 0: no limit known (no
/// feedback, or none yet that showed a queue growing).
#[derive(Clone, Default)]
pub struct Estimate(Arc<AtomicU64>);

impl Estimate {
    pub fn bits_per_second(&self) -> Option<u64> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            bps => Some(bps),
        }
    }

    fn set(&self, bps: f64) {
        self.0.store(bps.max(1.0) as u64, Ordering::Relaxed);
    }
}

/// The delay-based half of Google Congestion Control, built from webrtc's
/// parts, publishing its estimate as an [`Estimate`].
///
/// webrtc's own `Gcc` compares the filtered delay change per packet group
/// with the overuse threshold as it is. libwebrtc first multiplies it by the
/// number of groups seen (at most 60), and its threshold is tuned for that:
/// without it a queue has to grow by 40 % of real time before anything is
/// noticed, and a link 20 % too slow never is. The rate follows [`Aimd`].
pub struct Reporting {
    slope: SlopeEstimator,
    detector: OveruseDetector,
    received: RateCalculator,
    control: Aimd,
    deltas: u32,
    estimate: Estimate,
}

impl Reporting {
    pub fn new(estimate: Estimate) -> Reporting {
        Reporting {
            slope: SlopeEstimator::new(),
            detector: OveruseDetector::new(),
            received: RateCalculator::default(),
            control: Aimd::new(START_BPS),
            deltas: 0,
            estimate,
        }
    }
}

impl BandwidthEstimator for Reporting {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        let mut usage = self.detector.usage();
        for report in reports {
            if report.arrived {
                self.received.add(now, report.size);
            }
            if let Some(trend) = self.slope.accumulate(report) {
                self.deltas = (self.deltas + 1).min(60);
                usage = self
                    .detector
                    .update(trend.at, trend.estimate_ms * self.deltas as f64);
            }
        }
        let received = self.received.rate_bits_per_second(now);
        let target = self.control.update(now, usage, received);
        // Until a queue has been seen to grow, nothing is known that would
        // justify sending a receiver less than it asks for.
        if self.control.capacity.is_some() || self.estimate.bits_per_second().is_some() {
            self.estimate.set(target);
        }
    }

    fn target_bitrate(&self) -> f64 {
        self.control.target
    }
}

/// The rate half: down to 85 % of what arrives when the queue grows, up by
/// 8 % a second while it does not, and only by about a packet per round
/// trip near the rate where the queue last grew. webrtc's `RateController`
/// stays in that careful mode for good after the first decrease, so one
/// burst of delay held a receiver's video small for minutes; here it ends
/// 20 s after the last decrease, or 50 % above the rate it happened at.
#[derive(Debug)]
pub struct Aimd {
    target: f64,
    /// What arrived when the queue last grew, and when.
    capacity: Option<(f64, Instant)>,
    last_change: Option<Instant>,
    last_over: Option<Instant>,
}

impl Aimd {
    const INTERVAL: Duration = Duration::from_millis(200);
    const DECREASE: f64 = 0.85;
    const INCREASE_PER_S: f64 = 1.08;
    const ADDITIVE_PER_S: f64 = 60_000.0;
    const FORGET_AFTER: Duration = Duration::from_secs(20);
    /// After this long without the queue growing, what arrived is what the
    /// link carries: the estimate goes straight back up to it. A burst of
    /// delay that was not the link (a join storm keeping the server or the
    /// receiver busy) then costs a second, not the minutes of creeping back
    /// from 85 %; a link that is really full grows its queue again first.
    const CALM: Duration = Duration::from_secs(1);

    pub fn new(start: f64) -> Aimd {
        Aimd {
            target: start,
            capacity: None,
            last_change: None,
            last_over: None,
        }
    }

    pub fn update(&mut self, now: Instant, usage: Usage, received: Option<f64>) -> f64 {
        match usage {
            Usage::Over => {
                // Once per interval: what arrives lags what was sent.
                if let Some(received) = received
                    && self.due(now)
                {
                    self.target = (received * Self::DECREASE).clamp(MIN_BPS, MAX_BPS);
                    self.capacity = Some((received, now));
                    self.last_change = Some(now);
                }
                self.last_over = Some(now);
            }
            Usage::Under => self.last_change = Some(now),
            Usage::Normal if self.due(now) => {
                let elapsed = self
                    .last_change
                    .map_or(Self::INTERVAL, |t| now.saturating_duration_since(t))
                    .min(Duration::from_secs(1))
                    .as_secs_f64();
                self.capacity = self.capacity.filter(|&(rate, at)| {
                    now.saturating_duration_since(at) < Self::FORGET_AFTER
                        && self.target < rate * 1.5
                });
                self.target = if self.capacity.is_some() {
                    self.target + Self::ADDITIVE_PER_S * elapsed
                } else {
                    self.target * Self::INCREASE_PER_S.powf(elapsed)
                };
                let calm = self
                    .last_over
                    .is_none_or(|t| now.saturating_duration_since(t) >= Self::CALM);
                if let Some(received) = received.filter(|_| calm) {
                    self.target = self.target.max(received);
                }
                self.target = self.target.clamp(MIN_BPS, MAX_BPS);
                self.last_change = Some(now);
            }
            Usage::Normal => {}
        }
        self.target
    }

    fn due(&self, now: Instant) -> bool {
        self.last_change
            .is_none_or(|t| now.saturating_duration_since(t) >= Self::INTERVAL)
    }
}

/// One video track as one receiver may take it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Demand {
    /// The largest layer it asks for and its loss allows; `OFF`: none.
    pub wanted: u8,
    /// Bit/s of each layer; 0 for a layer that does not flow.
    pub rates: [u32; MAX_LAYERS],
    /// The layer the last allocation allowed (`OFF`: none; the top layer:
    /// no limit). Going past it needs headroom.
    pub allowed: u8,
    /// The active speaker's video is served first.
    pub speaker: bool,
}

impl Demand {
    /// The layers it may step through, smallest first: those that flow up
    /// to the one it wants, or the smallest that flows if none is below it
    /// (what the forwarding path would send it anyway).
    fn steps(&self) -> Vec<(u8, u64)> {
        let flowing: Vec<u8> = (0..MAX_LAYERS as u8)
            .filter(|&l| self.rates[l as usize] > 0)
            .collect();
        let upto: Vec<u8> = flowing
            .iter()
            .copied()
            .filter(|&l| l <= self.wanted)
            .collect();
        let layers = if upto.is_empty() {
            flowing.first().copied().into_iter().collect()
        } else {
            upto
        };
        layers
            .into_iter()
            .map(|l| (l, self.rates[l as usize] as u64))
            .collect()
    }
}

/// The largest layer each track may have (`OFF`: none; the top layer: all
/// it wants) so that all of them fit in `budget` bit/s. Every track first
/// gets its smallest layer, in order of priority (the speaker, then larger
/// requests) while they fit; then each in the same order goes up one layer
/// at a time while the difference fits. A track that wants nothing, or has
/// nothing flowing, costs nothing and keeps what it had. With `upgrades`
/// false nothing goes past what it was allowed before.
pub fn allocate(budget: u64, demands: &[Demand], upgrades: bool) -> Vec<u8> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| (Reverse(demands[i].speaker), Reverse(demands[i].wanted), i));
    let steps: Vec<Vec<(u8, u64)>> = demands.iter().map(Demand::steps).collect();
    let mut given: Vec<Option<usize>> = vec![None; demands.len()];
    let mut used = 0u64;
    let fits = |used: u64, extra: u64, d: &Demand, step: usize, layer: u8| {
        if d.allowed == OFF || layer > d.allowed {
            upgrades && used + extra <= budget * UPGRADE_HEADROOM / 100
        } else if step == 0 {
            used + extra <= budget * KEEP_SMALLEST / 100
        } else {
            used + extra <= budget
        }
    };
    for step in 0..MAX_LAYERS {
        for &i in &order {
            let d = &demands[i];
            if d.wanted == OFF || given[i] != step.checked_sub(1) {
                continue;
            }
            let Some(&(layer, rate)) = steps[i].get(step) else {
                continue;
            };
            let extra = rate - step.checked_sub(1).map_or(0, |s| steps[i][s].1.min(rate));
            if fits(used, extra, d, step, layer) {
                used += extra;
                given[i] = Some(step);
            }
        }
    }
    demands
        .iter()
        .zip(&given)
        .zip(&steps)
        .map(|((d, g), s)| match (d.wanted, s.is_empty(), g) {
            // Not asked for: left as it was, so that it comes back at once.
            (OFF, _, _) => d.allowed,
            (_, true, _) => MAX_LAYERS as u8 - 1,
            (_, false, Some(step)) => layer_of(s, *step),
            (_, false, None) => OFF,
        })
        .collect()
}

/// How long a video the allocation would pause keeps its smallest layer
/// first. A pause blanks a tile and its return costs a keyframe, so it waits
/// for the estimate to stay low; meanwhile a link that is really too slow
/// queues up to this much more.
pub const PAUSE_AFTER: Duration = Duration::from_secs(2);

/// What to give a track that `allocate` gave `layer`: a video that flows and
/// now fits nothing keeps its smallest layer until it has fitted nothing for
/// [`PAUSE_AFTER`]. `since` is when that began, kept per receiver.
pub fn hold_pause(demand: &Demand, layer: u8, since: &mut Option<Instant>, now: Instant) -> u8 {
    if layer != OFF || demand.allowed == OFF {
        *since = None;
        return layer;
    }
    let started = *since.get_or_insert(now);
    let steps = demand.steps();
    if steps.is_empty() || now.saturating_duration_since(started) >= PAUSE_AFTER {
        OFF
    } else {
        layer_of(&steps, 0)
    }
}

/// The layer to allow a track given `step` of its `steps`: the top layer
/// (no limit) for the last step, since it can use no more.
fn layer_of(steps: &[(u8, u64)], step: usize) -> u8 {
    if step + 1 == steps.len() {
        MAX_LAYERS as u8 - 1
    } else {
        steps[step].0
    }
}

/// When a receiver may be given more than it has. Its estimate climbs
/// slowly while what it is sent stays below it, with nothing to show the
/// link is not full; so an upgrade is a probe, and when the estimate pushes
/// a layer back down soon after, the next one waits twice as long.
#[derive(Debug)]
pub struct Backoff {
    hold: Duration,
    hold_until: Option<Instant>,
    last_up: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            hold: Backoff::FIRST_HOLD,
            hold_until: None,
            last_up: None,
        }
    }
}

impl Backoff {
    const FIRST_HOLD: Duration = Duration::from_secs(5);
    const MAX_HOLD: Duration = Duration::from_secs(60);
    /// An upgrade undone within this long did not hold.
    const FAILED_WITHIN: Duration = Duration::from_secs(10);

    pub fn may_upgrade(&self, now: Instant) -> bool {
        self.hold_until.is_none_or(|t| now >= t)
    }

    /// Takes what an allocation changed: `down`, a layer lowered for
    /// bandwidth; `up`, a layer raised.
    pub fn record(&mut self, now: Instant, down: bool, up: bool) {
        if down {
            let failed = self
                .last_up
                .is_some_and(|t| now.saturating_duration_since(t) < Self::FAILED_WITHIN);
            self.hold = if failed {
                (self.hold * 2).min(Self::MAX_HOLD)
            } else {
                Self::FIRST_HOLD
            };
            self.hold_until = Some(now + self.hold);
        } else if up {
            self.last_up = Some(now);
        }
    }
}

/// What one allocation did to a track: (lowered for bandwidth, raised).
/// `OFF` ranks below every layer.
pub fn change(demand: &Demand, now_allowed: u8) -> (bool, bool) {
    let rank = |l: u8| if l == OFF { -1 } else { l as i16 };
    let (was, now) = (rank(demand.allowed), rank(now_allowed));
    (now < was && now < rank(demand.wanted), now > was)
}

/// Rates of the layers flowing in `flowing` (bit `n`: layer `n`), from
/// `measured`, guessed where not measured yet.
pub fn rates(measured: [u32; MAX_LAYERS], flowing: u8) -> [u32; MAX_LAYERS] {
    std::array::from_fn(|l| match (flowing & (1 << l) != 0, measured[l]) {
        (false, _) => 0,
        (true, 0) => GUESS_BPS[l],
        (true, bps) => bps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u32 = 1000;

    fn video(wanted: u8, rates: [u32; 3]) -> Demand {
        Demand {
            wanted,
            rates,
            allowed: 2,
            speaker: false,
        }
    }

    #[test]
    fn plenty_gives_everyone_what_they_ask_for() {
        let d = [
            video(2, [150 * K, 500 * K, 1500 * K]),
            video(1, [150 * K, 500 * K, 0]),
        ];
        assert_eq!(allocate(10_000_000, &d, true), [2, 2]);
    }

    #[test]
    fn everyone_gets_the_small_layer_before_anyone_a_big_one() {
        let d = [video(2, [100 * K, 300 * K, 1000 * K]); 3];
        // 3 × 100 k, then one step up to 300 k (+200 k) for the first two.
        assert_eq!(allocate(700_000, &d, true), [1, 1, 0]);
        assert_eq!(allocate(250_000, &d, true), [0, 0, OFF]);
    }

    #[test]
    fn the_speaker_goes_first() {
        let mut d = [video(2, [100 * K, 300 * K, 1000 * K]); 3];
        d[2].speaker = true;
        assert_eq!(allocate(600_000, &d, true), [0, 0, 1]);
        // Up one layer at a time, all of them, before the speaker's next.
        assert_eq!(allocate(1_400_000, &d, true), [1, 1, 1]);
        assert_eq!(allocate(100_000, &d, true), [OFF, OFF, 0]);
    }

    #[test]
    fn going_up_needs_headroom_but_staying_does_not() {
        let mut d = [video(1, [100 * K, 300 * K, 0])];
        d[0].allowed = 1;
        assert_eq!(allocate(300_000, &d, true), [2]);
        d[0].allowed = 0;
        assert_eq!(allocate(300_000, &d, true), [0], "300 k > 85 % of 300 k");
        assert_eq!(allocate(360_000, &d, true), [2]);
    }

    #[test]
    fn a_video_keeps_its_smallest_layer_while_the_link_carries_it() {
        let mut d = [video(2, [1200 * K, 0, 0])];
        // One overuse: the estimate is 85 % of the 1.3 Mbit/s that arrived.
        assert_eq!(allocate(1_100_000 - 40_000, &d, true), [2]);
        // A link that carries less pauses it; it resumes when it fits the
        // estimate itself, with headroom.
        assert_eq!(allocate(800_000, &d, true), [OFF]);
        d[0].allowed = OFF;
        assert_eq!(allocate(1_100_000, &d, true), [OFF]);
        assert_eq!(allocate(1_450_000, &d, true), [2]);
    }

    #[test]
    fn single_layer_tracks_are_on_or_off() {
        let d = [video(2, [800 * K, 0, 0]), video(2, [800 * K, 0, 0])];
        assert_eq!(allocate(1_000_000, &d, true), [2, OFF]);
    }

    #[test]
    fn what_is_not_wanted_or_not_flowing_costs_nothing() {
        let d = [
            video(OFF, [100 * K, 300 * K, 0]),
            video(2, [0, 0, 0]),
            video(2, [100 * K, 300 * K, 0]),
        ];
        assert_eq!(allocate(300_000, &d, true), [2, 2, 2]);
    }

    #[test]
    fn a_small_request_with_only_a_big_layer_flowing_pays_for_it() {
        // The publisher paused its small layer; the receiver would be sent
        // the big one anyway.
        let d = [video(0, [0, 0, 900 * K])];
        assert_eq!(allocate(1_000_000, &d, true), [2]);
        assert_eq!(allocate(500_000, &d, true), [OFF]);
    }

    #[test]
    fn no_upgrades_while_held() {
        let mut d = [video(2, [100 * K, 300 * K, 1000 * K]); 2];
        d[0].allowed = 0;
        d[1].allowed = OFF;
        assert_eq!(allocate(10_000_000, &d, false), [0, OFF]);
    }

    #[test]
    fn an_upgrade_that_does_not_hold_is_tried_again_later_and_later() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Backoff::default();
        assert!(b.may_upgrade(t0));
        b.record(at(0), true, false);
        assert!(!b.may_upgrade(at(4)) && b.may_upgrade(at(5)));
        b.record(at(5), false, true);
        b.record(at(7), true, false); // undone after 2 s: wait 10 s
        assert!(!b.may_upgrade(at(16)) && b.may_upgrade(at(17)));
        b.record(at(17), false, true);
        b.record(at(19), true, false); // 20 s
        assert!(!b.may_upgrade(at(38)) && b.may_upgrade(at(39)));
        b.record(at(39), false, true);
        b.record(at(100), true, false); // held a minute: back to 5 s
        assert!(b.may_upgrade(at(105)));
    }

    #[test]
    fn a_smaller_request_is_not_a_bandwidth_downgrade() {
        let mut d = video(0, [100 * K, 300 * K, 0]);
        assert_eq!(change(&d, 0), (false, false), "asked for 0, got 0");
        d.wanted = 2;
        assert_eq!(change(&d, 1), (true, false));
        assert_eq!(change(&d, OFF), (true, false));
        d.allowed = OFF;
        assert_eq!(change(&d, 0), (false, true));
    }

    #[test]
    fn after_a_decrease_the_rate_creeps_back_then_climbs_again() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut aimd = Aimd::new(10_000_000.0);
        assert_eq!(
            aimd.update(at(0), Usage::Over, Some(1_000_000.0)),
            850_000.0
        );
        // Still overused in the same interval: no second cut.
        assert_eq!(
            aimd.update(at(100), Usage::Over, Some(900_000.0)),
            850_000.0
        );
        let mut ms = 100;
        let mut rate = 0.0;
        while rate < 1_000_000.0 {
            ms += 200;
            rate = aimd.update(at(ms), Usage::Normal, Some(850_000.0));
        }
        // 150 k at 60 k/s: about 2.5 s of creeping.
        assert!((2_400..=2_800).contains(&ms), "{ms} ms");
        while rate < 1_500_000.0 {
            ms += 200;
            rate = aimd.update(at(ms), Usage::Normal, Some(850_000.0));
        }
        let creeping_ends = ms;
        while rate < 3_000_000.0 {
            ms += 200;
            rate = aimd.update(at(ms), Usage::Normal, Some(850_000.0));
        }
        // Doubling at 8 %/s takes 9 s; creeping would take 25 s.
        assert!(ms - creeping_ends < 10_000, "{} ms", ms - creeping_ends);
    }

    #[test]
    fn after_a_calm_second_the_estimate_is_what_arrived() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut aimd = Aimd::new(10_000_000.0);
        // A burst of delay while little had arrived yet.
        aimd.update(at(0), Usage::Over, Some(6_000_000.0));
        let mut ms = 0;
        let mut rate = 0.0;
        while ms < 800 {
            ms += 200;
            rate = aimd.update(at(ms), Usage::Normal, Some(9_000_000.0));
        }
        assert!(rate < 6_000_000.0, "{rate}");
        ms += 200;
        rate = aimd.update(at(ms), Usage::Normal, Some(9_000_000.0));
        assert_eq!(rate, 9_000_000.0);
    }

    #[test]
    fn a_video_is_paused_only_after_it_fitted_nothing_for_a_while() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let flowing = Demand {
            allowed: 1,
            ..video(1, [150 * K, 500 * K, 0])
        };
        let mut since = None;
        assert_eq!(hold_pause(&flowing, OFF, &mut since, at(0)), 0);
        assert_eq!(hold_pause(&flowing, OFF, &mut since, at(1_500)), 0);
        // It fits again: the clock starts over.
        assert_eq!(hold_pause(&flowing, 1, &mut since, at(1_900)), 1);
        assert_eq!(hold_pause(&flowing, OFF, &mut since, at(2_000)), 0);
        assert_eq!(hold_pause(&flowing, OFF, &mut since, at(3_900)), 0);
        assert_eq!(hold_pause(&flowing, OFF, &mut since, at(4_000)), OFF);
        // A single layer is kept as all it can use.
        let single = Demand {
            allowed: 2,
            ..video(2, [0, 0, 900 * K])
        };
        assert_eq!(hold_pause(&single, OFF, &mut None, at(0)), 2);
        // Once paused it stays paused until it fits.
        let paused = Demand {
            allowed: OFF,
            ..flowing
        };
        assert_eq!(hold_pause(&paused, OFF, &mut since, at(4_500)), OFF);
        assert_eq!(since, None);
    }

    #[test]
    fn unmeasured_layers_are_guessed() {
        assert_eq!(rates([0, 400 * K, 0], 0b011), [GUESS_BPS[0], 400 * K, 0]);
    }
}
