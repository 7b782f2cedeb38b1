//! A published track and its receivers: the forwarding path.
//!
//! One task per published track reads the publisher's RTP and, for each
//! receiver, rewrites a copy and hands it to the receiver's peer connection
//! without waiting: when that connection's queue is full the packet is
//! dropped for that receiver alone (it asks again by NACK), so a slow
//! receiver never holds up the others. No task sits between the publisher
//! and the receivers' connections: a hop per packet per receiver was a
//! measurable share of the forwarding cost (`loadtest/README.md`). The
//! receiver list is swapped whole on change (`ArcSwap`), so the per-packet
//! read takes no lock, and each receiver's rewrite state is locked only by
//! this task. With simulcast, a receiver is handed only the layer it is on
//! and the one it is switching to (see [`crate::simulcast`]).

use crate::bandwidth::{self, Demand};
use crate::downlink::{self, Downlink};
use crate::forward::{
    self, AUDIO_LEVEL_URI, ExtensionMap, Rewriter, SILENT, SilenceFilter, audio_level,
};
use crate::keyframe::{Decision, Limiter, is_keyframe_request};
use crate::peer::Participant;
use crate::simulcast::{self, Layers, MAX_LAYERS, Selector, Verdict};
use crate::tap::{TapSender, Tapped};
use crate::uplink::{NewTrack, Uplink};
use arc_swap::{ArcSwap, ArcSwapOption};
use confer_transport::OutStream;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{debug, trace};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::rtp_transceiver::RtpSender;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    Audio,
    Video,
}

impl From<RtpCodecKind> for TrackKind {
    fn from(k: RtpCodecKind) -> Self {
        match k {
            RtpCodecKind::Audio => TrackKind::Audio,
            _ => TrackKind::Video,
        }
    }
}

/// What clients are told about a published track.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct TrackInfo {
    /// Unique in the room; also the track id the receivers see.
    pub id: String,
    pub kind: TrackKind,
    /// e.g. "audio/opus", "video/VP8".
    pub codec: String,
}

/// What arrives of a published track, whichever connection it comes on.
pub(crate) enum Incoming {
    /// A stream of it starts: a simulcast layer when it has a rid.
    Open {
        ssrc: u32,
        rid: Option<String>,
    },
    Rtp(rtp::Packet),
    /// The publisher's sender report: its RTP time at an NTP time.
    SenderReport {
        ssrc: u32,
        ntp: u64,
        rtp_time: u32,
    },
}

/// Where a published track comes from.
pub(crate) enum Source {
    /// A webrtc peer connection's remote track.
    WebRtc(Arc<dyn TrackRemote>),
    /// The participant's own uplink ([`crate::uplink`]): its packets, taken
    /// by the forwarding task when it starts.
    Uplink {
        link: Weak<Uplink>,
        packets: Mutex<Option<mpsc::Receiver<Incoming>>>,
    },
}

/// A track one participant publishes.
pub struct Published {
    pub info: TrackInfo,
    pub publisher: String,
    pub codec: RTCRtpCodec,
    source: Source,
    /// The publisher's streams: one, or one per simulcast layer.
    pub layers: Layers,
    /// Publisher-side negotiated header extensions, `(uri, id)`.
    extensions: Vec<(String, u16)>,
    receivers: ArcSwap<Vec<Arc<Receiver>>>,
    /// Keyframe requests per layer.
    keyframes: [Mutex<Limiter>; MAX_LAYERS],
    /// Smoothed loudness (127 - dBov) × 16, for active-speaker detection.
    loudness: AtomicU32,
    /// Among the room's `audio_last_n` loudest microphones (audio only;
    /// packets without a level are forwarded regardless).
    audible: AtomicBool,
    /// Level for that ranking ([`forward::follow_peak`], 1/16 dB): quicker
    /// to rise than `loudness`, so a new voice is let in at once.
    peak: AtomicU32,
    /// Packets seen, for stats and tests.
    pub packets: AtomicU64,
    /// The publisher's moderator-mute flag; audio only (video has none).
    blocked: Option<Arc<AtomicBool>>,
    /// The room's tap (a recording), if any.
    pub(crate) tap: ArcSwapOption<TapSender>,
    /// `info.id`, shared with every tapped packet.
    pub(crate) tap_id: Arc<str>,
    /// The simulcast layer the tap is on.
    tap_layer: AtomicU8,
}

/// Where a receiver's copy goes.
pub(crate) enum Output {
    /// A transceiver on the subscriber's webrtc peer connection.
    WebRtc {
        local: Arc<TrackLocalStaticRTP>,
        sender: Arc<dyn RtpSender>,
    },
    /// A section of the subscriber's own downlink ([`crate::downlink`]).
    Downlink { link: Arc<Downlink>, rtx_ssrc: u32 },
}

/// One receiver's copy of a published track.
pub struct Receiver {
    pub subscriber: String,
    pub(crate) output: Output,
    track: Weak<Published>,
    /// Its leg has been negotiated (its rewriter is being made or made).
    ready: AtomicBool,
    /// What the forwarding task keeps for it between packets.
    sending: Mutex<Sending>,
    /// Asked for video again after being off: start over from a keyframe.
    resume: AtomicBool,
    /// The simulcast layer it asked for (default: the largest).
    requested: AtomicU8,
    /// The largest layer its reception allows ([`simulcast::LossCeiling`]).
    ceiling: AtomicU8,
    /// The largest layer its bandwidth allows ([`crate::bandwidth`]); `OFF`: none.
    allowed: AtomicU8,
    /// Since when its bandwidth has fitted no layer ([`bandwidth::hold_pause`]).
    pausing_since: Mutex<Option<Instant>>,
    /// Lowers [`Self::ceiling`] while its reports show heavy loss.
    loss: Mutex<simulcast::LossCeiling>,
    /// The SSRC it receives this track on.
    out_ssrc: u32,
    /// The layer it is on; `NO_LAYER` before the first.
    current: AtomicU8,
}

const NO_LAYER: u8 = u8::MAX;

/// One track as one receiver gets it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Reception {
    pub track_id: String,
    /// The layer it is sent (0: the smallest; audio and single-layer video:
    /// 0); `None` before the first packet, or while it gets none.
    pub layer: Option<u8>,
    /// The quality it asked for (`off`: a tile out of sight).
    pub requested: simulcast::Quality,
    /// Paused because its link fits no layer of the video.
    pub paused: bool,
    /// A microphone not among the room's `audio_last_n` loudest: sent to
    /// nobody for now.
    #[serde(default)]
    pub left_out: bool,
}

/// A receiver's forwarding state, locked only by the track's forwarding
/// task once the rewriter is in place.
#[derive(Default)]
struct Sending {
    /// None until its leg is negotiated: nothing is sent before.
    rewriter: Option<Rewriter>,
    selector: Selector,
    /// When it last sent a packet, and whether it was paused since.
    last_sent: Option<Instant>,
    resumed: bool,
    /// On a downlink: its stream, once the downlink is connected.
    stream: Option<OutStream>,
}

impl Published {
    pub(crate) async fn new(
        publisher: &Participant,
        remote: Arc<dyn TrackRemote>,
        extensions: Vec<(String, u16)>,
    ) -> Option<Arc<Published>> {
        let first_ssrc = *remote.ssrcs().await.first()?;
        let codec = remote.codec(first_ssrc).await?;
        let kind = TrackKind::from(remote.kind().await);
        let id = format!("{}-{}", publisher.id, remote.track_id().await);
        Some(Arc::new(Published::build(
            publisher,
            id,
            kind,
            codec,
            Source::WebRtc(remote),
            first_ssrc,
            extensions,
        )))
    }

    fn build(
        publisher: &Participant,
        id: String,
        kind: TrackKind,
        codec: RTCRtpCodec,
        source: Source,
        first_ssrc: u32,
        extensions: Vec<(String, u16)>,
    ) -> Published {
        let blocked = (kind == TrackKind::Audio).then(|| publisher.audio_blocked.clone());
        Published {
            tap: ArcSwapOption::empty(),
            tap_id: id.as_str().into(),
            info: TrackInfo {
                id,
                kind,
                codec: codec.mime_type.to_ascii_lowercase(),
            },
            publisher: publisher.id.clone(),
            codec,
            source,
            layers: Layers::new(first_ssrc),
            extensions,
            receivers: ArcSwap::from_pointee(Vec::new()),
            keyframes: Default::default(),
            tap_layer: AtomicU8::new(0),
            loudness: AtomicU32::new(0),
            audible: AtomicBool::new(true),
            peak: AtomicU32::new(0),
            packets: AtomicU64::new(0),
            blocked,
        }
    }

    /// A track of the participant's own uplink.
    pub(crate) fn from_uplink(
        publisher: &Participant,
        link: Weak<Uplink>,
        track: NewTrack,
    ) -> Arc<Published> {
        let kind = match track.kind {
            confer_transport::sdp::Kind::Audio => TrackKind::Audio,
            confer_transport::sdp::Kind::Video => TrackKind::Video,
        };
        let id = format!("{}-{}", publisher.id, track.track_id);
        let source = Source::Uplink {
            link,
            packets: Mutex::new(Some(track.packets)),
        };
        Arc::new(Published::build(
            publisher,
            id,
            kind,
            track.codec,
            source,
            track.first_ssrc,
            track.extensions,
        ))
    }

    /// The next thing to arrive; `None` once the track has ended.
    async fn next(&self, uplink: &mut Option<mpsc::Receiver<Incoming>>) -> Option<Incoming> {
        match &self.source {
            Source::WebRtc(remote) => loop {
                match remote.poll().await? {
                    TrackRemoteEvent::OnOpen(init) => {
                        return Some(Incoming::Open {
                            ssrc: init.ssrc,
                            rid: init.rid,
                        });
                    }
                    TrackRemoteEvent::OnRtpPacket(pkt) => return Some(Incoming::Rtp(pkt)),
                    TrackRemoteEvent::OnRtcpPacket(packets) => {
                        for p in packets {
                            if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                                return Some(Incoming::SenderReport {
                                    ssrc: sr.ssrc,
                                    ntp: sr.ntp_time,
                                    rtp_time: sr.rtp_time,
                                });
                            }
                        }
                    }
                    TrackRemoteEvent::OnEnded => return None,
                    _ => {}
                }
            },
            Source::Uplink { .. } => uplink.as_mut()?.recv().await,
        }
    }

    /// Reads the publisher's RTP until the track ends, fanning out to receivers.
    /// Returns when the publisher's track has ended.
    pub(crate) async fn forward(self: Arc<Self>) {
        let level_id = self
            .extensions
            .iter()
            .find(|(u, _)| u == AUDIO_LEVEL_URI)
            .map_or(0, |(_, id)| *id as u8);
        let mut silence = SilenceFilter::default();
        let mut tap = TapLayer::default();
        let mut per_layer = [0u64; MAX_LAYERS + 1];
        let mut rates = simulcast::RateMeter::default();
        let mut uplink = match &self.source {
            Source::Uplink { packets, .. } => packets.lock().unwrap().take(),
            Source::WebRtc(_) => None,
        };
        while let Some(evt) = self.next(&mut uplink).await {
            match evt {
                Incoming::Open { ssrc, rid } => {
                    debug!(track = %self.info.id, ssrc, rid = ?rid, "stream opened");
                    self.layers.open(ssrc, rid.as_deref());
                }
                Incoming::Rtp(mut pkt) => {
                    let arrived = Instant::now();
                    self.packets.fetch_add(1, Ordering::Relaxed);
                    let Some(layer) = self.layers.layer(pkt.header.ssrc) else {
                        trace!(track = %self.info.id, ssrc = pkt.header.ssrc, "packet of no known layer");
                        per_layer[MAX_LAYERS] += 1;
                        continue;
                    };
                    per_layer[layer as usize] += 1;
                    self.layers.saw(layer, arrived);
                    if self
                        .blocked
                        .as_ref()
                        .is_some_and(|b| b.load(Ordering::Relaxed))
                    {
                        continue;
                    }
                    let level = audio_level(&pkt, level_id).map(|(level, _voice)| level);
                    if let Some(level) = level {
                        self.update_loudness(level);
                    }
                    if let Some(sender) = &*self.tap.load()
                        && let Some(packet) = tap.admit(&self, &pkt, layer, arrived)
                    {
                        let _ = sender.try_send(Tapped::Rtp {
                            track_id: self.tap_id.clone(),
                            at: arrived,
                            packet,
                        });
                    }
                    // After the tap: the recording keeps its timeline from the
                    // publisher's own numbering, and hears every microphone.
                    // One not among the loudest is dropped as silence is.
                    let audible = self.audible.load(Ordering::Relaxed);
                    let level = level.map(|l| if audible { l } else { SILENT });
                    if !silence.admit(&mut pkt, level) {
                        continue;
                    }
                    rates.add(&self.layers, layer, pkt.payload.len(), arrived);
                    let flowing = self.layers.flowing(arrived);
                    for r in self.receivers.load().iter() {
                        // Nothing for a receiver that may have none; else only
                        // the layer it is on and the one it is to go to.
                        let Some(target) = r.target(flowing) else {
                            continue;
                        };
                        if layer != target && layer != r.current.load(Ordering::Relaxed) {
                            continue;
                        }
                        if let Some(out) = self.rewrite_for(r, &pkt, arrived, layer, target) {
                            r.send(out);
                        }
                    }
                }
                Incoming::SenderReport {
                    ssrc,
                    ntp,
                    rtp_time,
                } => self.sender_report(ssrc, ntp, rtp_time, &tap),
            }
        }
        debug!(track = %self.info.id, packets = self.packets.load(Ordering::Relaxed),
            ?per_layer, "published track ended (packets per layer, last: of no layer)");
    }

    /// Passes a publisher's sender report to the tap: it maps RTP time to
    /// the publisher's wallclock, which lines up its audio and video.
    fn sender_report(&self, ssrc: u32, ntp: u64, rtp_time: u32, tap: &TapLayer) {
        let Some(sender) = &*self.tap.load() else {
            return;
        };
        if let Some(rtp) = tap.report_time(self, ssrc, rtp_time) {
            let _ = sender.try_send(Tapped::SenderReport {
                track_id: self.tap_id.clone(),
                ntp,
                rtp,
            });
        }
    }

    pub fn clock_rate(&self) -> u32 {
        self.codec.clock_rate
    }

    fn update_loudness(&self, dbov: u8) {
        // Exponential smoothing over ~10 packets (200 ms of audio).
        let sample = (127 - dbov.min(127) as u32) * 16;
        let prev = self.loudness.load(Ordering::Relaxed);
        self.loudness
            .store((prev * 9 + sample) / 10, Ordering::Relaxed);
        let peak = self.peak.load(Ordering::Relaxed);
        self.peak
            .store(forward::follow_peak(peak, dbov), Ordering::Relaxed);
    }

    /// Smoothed loudness, 0 (silent) to 127 (full scale).
    pub fn loudness(&self) -> u32 {
        self.loudness.load(Ordering::Relaxed) / 16
    }

    /// Its level for ranking microphones, 0 (silent) to 127 (full scale).
    pub fn peak(&self) -> u32 {
        self.peak.load(Ordering::Relaxed) / 16
    }

    /// Whether it is among the loudest microphones, forwarded.
    pub fn is_audible(&self) -> bool {
        self.audible.load(Ordering::Relaxed)
    }

    pub(crate) fn set_audible(&self, audible: bool) {
        if self.audible.swap(audible, Ordering::Relaxed) != audible {
            debug!(track = %self.info.id, audible, "microphone among the loudest: changed");
        }
    }

    /// Adds a receiver; it sends once [`Receiver::negotiated`].
    pub(crate) fn add_receiver(
        self: &Arc<Self>,
        subscriber: &str,
        output: Output,
        out_ssrc: u32,
    ) -> Arc<Receiver> {
        let r = Arc::new(Receiver {
            subscriber: subscriber.to_owned(),
            output,
            track: Arc::downgrade(self),
            ready: AtomicBool::new(false),
            sending: Mutex::default(),
            resume: AtomicBool::new(false),
            requested: AtomicU8::new(simulcast::Quality::High.layer()),
            ceiling: AtomicU8::new(simulcast::Quality::High.layer()),
            allowed: AtomicU8::new(simulcast::Quality::High.layer()),
            pausing_since: Mutex::new(None),
            loss: Mutex::default(),
            current: AtomicU8::new(NO_LAYER),
            out_ssrc,
        });
        self.receivers.rcu(|list| {
            let mut list = Vec::clone(list);
            list.push(r.clone());
            list
        });
        r
    }

    /// `pkt` rewritten for `r`, if it is to be sent to it now; `target` is
    /// the layer `r` should be on.
    fn rewrite_for(
        self: &Arc<Self>,
        r: &Receiver,
        pkt: &rtp::Packet,
        arrived: Instant,
        layer: u8,
        target: u8,
    ) -> Option<rtp::Packet> {
        let mut sending = r.sending.lock().unwrap();
        let s = &mut *sending;
        let rw = s.rewriter.as_mut()?;
        if r.resume.swap(false, Ordering::AcqRel) {
            s.resumed = true;
            s.selector = Selector::default();
            r.current.store(NO_LAYER, Ordering::Relaxed);
            self.request_layer_keyframe(target);
        }
        if self.layers.is_simulcast() {
            let mime = &self.codec.mime_type;
            match s.selector.admit(layer, Some(target), || {
                simulcast::starts_keyframe(mime, &pkt.payload)
            }) {
                Verdict::Forward => {}
                Verdict::Switch => {
                    debug!(subscriber = %r.subscriber, track = %self.info.id, layer, "simulcast layer switched");
                    r.current.store(layer, Ordering::Relaxed);
                }
                Verdict::Drop => return None,
                Verdict::NeedKeyframe => {
                    self.request_layer_keyframe(layer);
                    return None;
                }
            }
        } else {
            r.current.store(layer, Ordering::Relaxed);
        }
        if let Some(at) = s.last_sent.filter(|_| std::mem::take(&mut s.resumed)) {
            let paused = arrived.saturating_duration_since(at);
            let ticks = paused.as_micros() * u128::from(self.codec.clock_rate) / 1_000_000;
            rw.resume(ticks.min(u128::from(u32::MAX / 2)) as u32);
        }
        let mut out = forward::copy_for_receiver(pkt);
        if !rw.rewrite(&mut out) {
            return None;
        }
        s.last_sent = Some(arrived);
        match &r.output {
            Output::WebRtc { .. } => Some(out),
            // Sent here, under the lock this task already holds.
            Output::Downlink { link, .. } => {
                if let Some(stream) = s.stream.as_mut() {
                    link.send(stream, out, arrived);
                }
                None
            }
        }
    }

    /// Once `r`'s leg is negotiated: learns its payload type and extension
    /// ids, then starts sending it and listening to its feedback.
    async fn start_sending(self: Arc<Self>, r: Arc<Receiver>) {
        match &r.output {
            Output::WebRtc { .. } => {
                let Some(rewriter) = make_rewriter(&self, &r, r.out_ssrc).await else {
                    return;
                };
                r.sending.lock().unwrap().rewriter = Some(rewriter);
                // The track is bound only now; before, poll() has nothing to wait on.
                tokio::spawn(feedback_loop(self.clone(), r.clone()));
            }
            Output::Downlink { link, rtx_ssrc } => {
                if !link.connected().await {
                    return;
                }
                let Some(section) =
                    downlink::section(String::new(), &self.codec, r.out_ssrc, *rtx_ssrc, "", "")
                else {
                    return;
                };
                let codec = &section.codecs[0];
                let rtx = codec.rtx.map(|payload_type| confer_transport::Rtx {
                    ssrc: *rtx_ssrc,
                    payload_type,
                });
                let Some(stream) = link.out_stream(&r, r.out_ssrc, self.codec.clock_rate, rtx)
                else {
                    return;
                };
                let ids: Vec<(&str, u16)> = section
                    .extensions
                    .iter()
                    .map(|(id, uri)| (*uri, u16::from(*id)))
                    .collect();
                let map = ExtensionMap::new(
                    self.extensions.iter().map(|(u, id)| (u.as_str(), *id)),
                    ids.iter().copied(),
                );
                let mut sending = r.sending.lock().unwrap();
                sending.stream = Some(stream);
                sending.rewriter = Some(Rewriter::new(r.out_ssrc, codec.payload_type, map));
                debug!(subscriber = %r.subscriber, track = %self.info.id, "downlink stream ready");
            }
        }
        // A new receiver needs a keyframe to start decoding.
        let flowing = self.layers.flowing(Instant::now());
        self.request_layer_keyframe(r.target(flowing).unwrap_or(0));
    }

    pub(crate) fn remove_receiver(&self, subscriber: &str) -> Option<Arc<Receiver>> {
        let mut removed = None;
        self.receivers.rcu(|list| {
            let mut list = Vec::clone(list);
            if let Some(i) = list.iter().position(|r| r.subscriber == subscriber) {
                removed = Some(list.remove(i));
            }
            list
        });
        removed
    }

    pub fn receiver_count(&self) -> usize {
        self.receivers.load().len()
    }

    /// Asks the publisher for a keyframe of the layer the tap (a
    /// recording) is on.
    pub fn request_keyframe(self: &Arc<Self>) {
        self.request_layer_keyframe(self.tap_layer.load(Ordering::Relaxed));
    }

    /// Asks the publisher for a keyframe of `layer`, coalesced and
    /// rate-limited per layer.
    pub fn request_layer_keyframe(self: &Arc<Self>, layer: u8) {
        let Some(limiter) = self.keyframes.get(layer as usize) else {
            return;
        };
        if self.info.kind != TrackKind::Video {
            return;
        }
        let decision = limiter.lock().unwrap().request(Instant::now());
        match decision {
            Decision::SendNow => {
                let me = self.clone();
                tokio::spawn(async move { me.send_pli(layer).await });
            }
            Decision::SendAt(at) => {
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at.into()).await;
                    me.keyframes[layer as usize]
                        .lock()
                        .unwrap()
                        .sent_scheduled(Instant::now());
                    me.send_pli(layer).await;
                });
            }
            Decision::Coalesced => {}
        }
    }

    /// Sets the layer `subscriber` asks for; false if it does not receive
    /// this track.
    pub fn set_quality(&self, subscriber: &str, quality: simulcast::Quality) -> bool {
        let receivers = self.receivers.load();
        let Some(r) = receivers.iter().find(|r| r.subscriber == subscriber) else {
            return false;
        };
        if self.info.kind != TrackKind::Video {
            return true; // a video setting; audio is always sent
        }
        let was_off = r.is_off();
        r.requested.store(quality.layer(), Ordering::Relaxed);
        r.resume_if_on(was_off);
        true
    }

    /// Its receivers, for the bandwidth allocation.
    pub(crate) fn receivers(&self) -> Arc<Vec<Arc<Receiver>>> {
        self.receivers.load_full()
    }

    async fn send_pli(&self, layer: u8) {
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc: self.layers.ssrc(layer),
        };
        match &self.source {
            Source::WebRtc(remote) => {
                if let Err(e) = remote.write_rtcp(vec![Box::new(pli)]).await {
                    debug!(track = %self.info.id, "PLI not sent: {e}");
                }
            }
            Source::Uplink { link, .. } => {
                if let Some(link) = link.upgrade() {
                    link.request_keyframe(pli.media_ssrc);
                }
            }
        }
    }
}

impl Receiver {
    /// The layer it should be on, given the layers that flow; None: none.
    fn target(&self, flowing: u8) -> Option<u8> {
        let allowed = self.allowed.load(Ordering::Relaxed);
        match self.wanted() {
            simulcast::OFF => None,
            _ if allowed == simulcast::OFF => None,
            wanted => simulcast::target(wanted.min(allowed), flowing),
        }
    }

    /// The largest layer it asks for and its reception allows; `OFF`: none.
    fn wanted(&self) -> u8 {
        match self.requested.load(Ordering::Relaxed) {
            simulcast::OFF => simulcast::OFF,
            requested => requested.min(self.ceiling.load(Ordering::Relaxed)),
        }
    }

    fn is_off(&self) -> bool {
        self.requested.load(Ordering::Relaxed) == simulcast::OFF
            || self.allowed.load(Ordering::Relaxed) == simulcast::OFF
    }

    /// After a change that may have turned it back on: video starts over
    /// from a keyframe.
    fn resume_if_on(&self, was_off: bool) {
        if was_off && !self.is_off() {
            self.resume.store(true, Ordering::Release);
        }
    }

    /// Hands `pkt` to its peer connection if that has room now; otherwise
    /// the packet is lost to this receiver alone, which asks for it again.
    fn send(&self, pkt: rtp::Packet) {
        let Output::WebRtc { local, .. } = &self.output else {
            return;
        };
        // The write only queues the packet for the connection's driver, so
        // it is ready at once unless that queue is full; polling it once
        // and dropping it when pending gives up the packet, nothing else.
        let mut write = local.write_rtp(pkt);
        match write.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => {}
            // Unbound: the receiver's connection is going away.
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                trace!(subscriber = %self.subscriber, "receiver's connection busy, packet dropped")
            }
        }
    }

    /// What it asks of the bandwidth allocation, given the rates of the
    /// track's layers (0: not flowing).
    pub(crate) fn demand(&self, rates: [u32; MAX_LAYERS], speaker: bool) -> Demand {
        Demand {
            wanted: self.wanted(),
            rates,
            allowed: self.allowed.load(Ordering::Relaxed),
            speaker,
        }
    }

    /// How it receives `track`, for the admin API.
    pub(crate) fn reception(&self, track: &Published) -> Reception {
        let current = self.current.load(Ordering::Relaxed);
        Reception {
            track_id: track.info.id.clone(),
            layer: (current != NO_LAYER && !self.is_off()).then_some(current),
            requested: simulcast::Quality::of_layer(self.requested.load(Ordering::Relaxed)),
            paused: self.allowed.load(Ordering::Relaxed) == simulcast::OFF,
            left_out: !track.is_audible(),
        }
    }

    /// Sets the largest layer its bandwidth allows (`OFF`: none), given
    /// what it asked of the allocation, which gave it `layer`; a pause waits
    /// ([`bandwidth::hold_pause`]). Returns the layer allowed.
    pub(crate) fn allow(&self, demand: &Demand, layer: u8, track: &str, now: Instant) -> u8 {
        let layer =
            bandwidth::hold_pause(demand, layer, &mut self.pausing_since.lock().unwrap(), now);
        let was_off = self.is_off();
        let was = self.allowed.swap(layer, Ordering::Relaxed);
        if was != layer {
            debug!(subscriber = %self.subscriber, track, layer, was, "layer allowed by bandwidth changed");
        }
        self.resume_if_on(was_off);
        layer
    }

    /// A reception report on it: heavy loss lowers its layer for a while.
    pub(crate) fn reported(&self, fraction_lost: u8, now: Instant) {
        let current = match self.current.load(Ordering::Relaxed) {
            NO_LAYER => None,
            layer => Some(layer),
        };
        let ceiling = self
            .loss
            .lock()
            .unwrap()
            .report(fraction_lost, current, now);
        if self.ceiling.swap(ceiling, Ordering::Relaxed) != ceiling {
            debug!(subscriber = %self.subscriber, lost = fraction_lost, ceiling,
                "simulcast ceiling changed by loss");
        }
        trace!(subscriber = %self.subscriber, lost = fraction_lost, "receiver report");
    }

    /// Its client cannot decode until the next keyframe (PLI or FIR).
    pub(crate) fn keyframe_requested(&self) {
        if let (Some(track), layer) = (self.track.upgrade(), self.current.load(Ordering::Relaxed))
            && layer != NO_LAYER
        {
            track.request_layer_keyframe(layer);
        }
    }

    /// On a downlink: sends `sequence` again, if it is still kept.
    pub(crate) fn retransmit(&self, link: &Downlink, sequence: u16, now: Instant) {
        if let Some(stream) = self.sending.lock().unwrap().stream.as_mut() {
            link.retransmit(stream, sequence, now);
        }
    }

    /// On a downlink: a sender report for its stream, once it has sent.
    pub(crate) fn sender_report(
        &self,
        now: Instant,
        wallclock: std::time::SystemTime,
    ) -> Option<SenderReport> {
        self.sending
            .lock()
            .unwrap()
            .stream
            .as_ref()?
            .sender_report(now, wallclock)
    }

    /// The SSRCs it sends on.
    pub(crate) fn ssrcs(&self) -> Vec<u32> {
        match &self.output {
            Output::WebRtc { .. } => vec![self.out_ssrc],
            Output::Downlink { rtx_ssrc, .. } => vec![self.out_ssrc, *rtx_ssrc],
        }
    }

    /// Called once the receiver's leg has been negotiated.
    pub(crate) fn negotiated(self: &Arc<Self>) {
        if self.ready.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(track) = self.track.upgrade() {
            tokio::spawn(track.start_sending(self.clone()));
        }
    }
}

async fn make_rewriter(track: &Published, r: &Receiver, out_ssrc: u32) -> Option<Rewriter> {
    let Output::WebRtc { sender, .. } = &r.output else {
        return None;
    };
    let params = sender.get_parameters().await.ok()?;
    let mime = &track.codec.mime_type;
    let Some(codec) = params
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
    else {
        debug!(subscriber = %r.subscriber, %mime, "receiver did not accept the codec");
        return None;
    };
    let rx_exts: Vec<(&str, u16)> = params
        .rtp_parameters
        .header_extensions
        .iter()
        .map(|e| (e.uri.as_str(), e.id))
        .collect();
    let map = ExtensionMap::new(
        track.extensions.iter().map(|(u, id)| (u.as_str(), *id)),
        rx_exts.iter().copied(),
    );
    debug!(subscriber = %r.subscriber, track = %track.info.id, pt = codec.payload_type, "receiver negotiated");
    Some(Rewriter::new(out_ssrc, codec.payload_type, map))
}

/// Relays the receiver's keyframe requests to the publisher, and lowers
/// its simulcast layer while its reports show heavy loss.
async fn feedback_loop(track: Arc<Published>, r: Arc<Receiver>) {
    let Output::WebRtc { local, .. } = &r.output else {
        return;
    };
    while let Some(TrackLocalEvent::OnRtcpPacket(pkts)) = local.poll().await {
        let blocks = pkts
            .iter()
            .filter_map(|p| p.as_any().downcast_ref::<ReceiverReport>())
            .flat_map(|rr| rr.reports.iter())
            .filter(|b| b.ssrc == r.out_ssrc);
        for b in blocks {
            r.reported(b.fraction_lost, Instant::now());
        }
        if pkts.iter().any(|p| is_keyframe_request(p.as_ref())) {
            r.keyframe_requested();
        }
    }
    trace!(track = %track.info.id, subscriber = %r.subscriber, "feedback ended");
}

/// What the tap (a recording) gets of a simulcast track: one layer, the
/// largest that flows, renumbered into one continuous stream when it has to
/// change layer. Without simulcast, the packets as they came.
#[derive(Default)]
struct TapLayer {
    selector: Selector,
    rewriter: Option<Rewriter>,
}

impl TapLayer {
    fn admit(
        &mut self,
        track: &Arc<Published>,
        pkt: &rtp::Packet,
        layer: u8,
        now: Instant,
    ) -> Option<rtp::Packet> {
        if !track.layers.is_simulcast() {
            return Some(pkt.clone());
        }
        let target = simulcast::target(simulcast::Quality::High.layer(), track.layers.flowing(now));
        let mime = &track.codec.mime_type;
        match self.selector.admit(layer, target, || {
            simulcast::starts_keyframe(mime, &pkt.payload)
        }) {
            Verdict::Forward => {}
            Verdict::Switch => track.tap_layer.store(layer, Ordering::Relaxed),
            Verdict::Drop => return None,
            Verdict::NeedKeyframe => {
                // The recorder's own requests go to this layer from now on.
                track.tap_layer.store(layer, Ordering::Relaxed);
                track.request_layer_keyframe(layer);
                return None;
            }
        }
        let rw = self.rewriter.get_or_insert_with(|| {
            Rewriter::new(
                pkt.header.ssrc,
                pkt.header.payload_type,
                ExtensionMap::none(),
            )
        });
        let mut pkt = pkt.clone();
        rw.rewrite(&mut pkt);
        Some(pkt)
    }

    /// A sender report's RTP time on the tapped stream's timeline, if it is
    /// about the stream the tap follows.
    fn report_time(&self, track: &Published, ssrc: u32, rtp_time: u32) -> Option<u32> {
        if !track.layers.is_simulcast() {
            return (ssrc == track.layers.ssrc(0)).then_some(rtp_time);
        }
        self.rewriter.as_ref()?.map_timestamp(ssrc, rtp_time)
    }
}
