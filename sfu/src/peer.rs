//! One participant's peer connection: building it, negotiating it, and
//! noticing when it dies.
//!
//! Negotiation follows "perfect negotiation" with the SFU as the impolite
//! side: when both ends offer at once, the SFU ignores the client's offer and
//! the client rolls its own back. Offers the SFU needs while one is in flight
//! are batched into the next one.

use crate::bandwidth::{Backoff, Estimate, Reporting};
use crate::config::SfuConfig;
use crate::downlink::{self, Downlink};
use crate::error::SfuError;
use crate::keyframe::KeyframeRequestTap;
use crate::mux::Endpoint;
use crate::room::{ParticipantInfo, PeerEvent, Room, Sfu};
use crate::track::{Output, Published, Receiver, TrackKind};
use crate::uplink::{Uplink, UplinkEvent};
use confer_transport::sdp::Media;
use rand::Rng;
use rtc::interceptor::Slot;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCBundlePolicy, RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceCandidateType,
    RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder,
};

/// UDP ports handed to peer connections. A port goes back when its
/// participant leaves; a port some other process holds is skipped.
pub(crate) struct PortPool {
    min: u16,
    max: u16,
    state: Mutex<(HashSet<u16>, u16)>,
}

impl PortPool {
    pub(crate) fn new(min: u16, max: u16) -> Self {
        PortPool {
            min,
            max,
            state: Mutex::new((HashSet::new(), min)),
        }
    }

    /// Candidate ports to try, in order, each reserved until released.
    fn take(&self) -> Option<u16> {
        if self.min == 0 {
            return Some(0);
        }
        let mut st = self.state.lock().unwrap();
        let span = (self.max - self.min) as u32 + 1;
        for _ in 0..span {
            let port = st.1;
            st.1 = if port >= self.max { self.min } else { port + 1 };
            if st.0.insert(port) {
                return Some(port);
            }
        }
        None
    }

    fn release(&self, port: u16) {
        if port != 0 {
            self.state.lock().unwrap().0.remove(&port);
        }
    }

    fn span(&self) -> u32 {
        if self.min == 0 {
            1
        } else {
            (self.max - self.min) as u32 + 1
        }
    }
}

#[derive(Default)]
struct Negotiation {
    /// The client has offered once; the SFU offers only after that.
    started: bool,
    awaiting_answer: bool,
    /// A change waits for the next offer.
    pending: bool,
    /// A task will make the next offer ([`OFFER_SETTLE`], [`MIN_OFFER_INTERVAL`]).
    scheduled: bool,
    last_offer: Option<Instant>,
    offers_made: u64,
    offers_answered: u64,
    /// Receivers on this connection, with the offer that carries them.
    receivers: Vec<(Arc<Receiver>, u64, String)>,
    /// Candidates that came before the client's first offer (trickle ICE
    /// may overtake it), applied right after it.
    early_candidates: Vec<RTCIceCandidateInit>,
    /// On the downlink: every section so far, in order, and how many of
    /// them the last offer carried (more may have come since).
    sections: Vec<Media>,
    offered_sections: usize,
    /// Sections whose track is gone, each with the offer that makes it
    /// inactive: once that offer is answered, a new track of its kind takes
    /// the section over, so a long meeting's offers do not grow with every
    /// departure.
    idle: Vec<(usize, u64)>,
}

/// Which of a participant's connections an offer is for.
#[derive(Clone, Copy, Debug)]
enum Leg {
    /// The webrtc peer connection (the client offers first).
    Uplink,
    /// Its own downlink ([`crate::downlink`]), which only the SFU offers.
    Downlink,
}

/// An offer waits this long for more changes to go with it: a client's
/// audio and video arrive as two tracks, a moment apart, and one offer
/// for both saves a round trip.
const OFFER_SETTLE: Duration = Duration::from_millis(20);
/// The SFU offers to a participant at most every [`offer_interval`]. Every
/// offer carries an m-line per track the participant receives, so in a
/// large room a join storm (an all-hands starting on the hour) would
/// otherwise cost each of N participants an offer per join: O(N²) offers,
/// each O(N) long. The interval grows with the tracks received, so each
/// participant's renegotiation work per second stays the same in any room.
const MIN_OFFER_INTERVAL: Duration = Duration::from_millis(250);
const OFFER_INTERVAL_PER_TRACK: Duration = Duration::from_millis(5);
const MAX_OFFER_INTERVAL: Duration = Duration::from_secs(1);

fn offer_interval(tracks_received: usize) -> Duration {
    let tracks = u32::try_from(tracks_received).unwrap_or(u32::MAX);
    OFFER_INTERVAL_PER_TRACK
        .saturating_mul(tracks)
        .clamp(MIN_OFFER_INTERVAL, MAX_OFFER_INTERVAL)
}

/// Most candidates kept while waiting for the first offer.
const MAX_EARLY_CANDIDATES: usize = 64;

pub struct Participant {
    pub id: String,
    pub info: ParticipantInfo,
    /// Itself, for the task that makes its next offer.
    me: Weak<Participant>,
    candidates: Arc<FirstCandidates>,
    room: Weak<Room>,
    /// Its webrtc peer connection; none when it publishes on an uplink of
    /// our own and receives on a downlink.
    pc: Option<Arc<dyn PeerConnection>>,
    /// What it publishes, on a connection of our own ([`crate::uplink`]).
    uplink: Option<Arc<Uplink>>,
    /// Its share of the one media socket, under `udp_mux`.
    endpoint: Option<Arc<Endpoint>>,
    events: mpsc::UnboundedSender<PeerEvent>,
    negotiation: tokio::sync::Mutex<Negotiation>,
    /// What it receives, when it asked for a downlink of its own.
    downlink: Option<Arc<Downlink>>,
    down: tokio::sync::Mutex<Negotiation>,
    muted: Mutex<(bool, bool)>,
    /// Set by a moderator's mute: the forwarding loop drops this
    /// participant's audio until the participant unmutes themselves, so a
    /// client that ignores the request is still silent.
    pub(crate) audio_blocked: Arc<AtomicBool>,
    port: u16,
    sfu: Weak<Sfu>,
    closed: AtomicBool,
    /// Its room is closing: it leaves with everyone else, so nothing is
    /// renegotiated with it on the way out.
    pub(crate) leaving: AtomicBool,
    /// Last connection state, as `RTCPeerConnectionState as u8`.
    state: AtomicU8,
    /// Its downlink as estimated from its congestion feedback.
    pub(crate) estimate: Estimate,
    /// When its allocation may next go up.
    pub(crate) backoff: Mutex<Backoff>,
}

enum PcEvent {
    Track(Arc<dyn TrackRemote>),
    State(RTCPeerConnectionState),
}

struct Handler {
    pc_events: mpsc::UnboundedSender<PcEvent>,
    events: mpsc::UnboundedSender<PeerEvent>,
    candidates: Arc<FirstCandidates>,
    endpoint: Option<Arc<Endpoint>>,
}

/// How long the first answer waits for the SFU's own candidates. Gathering
/// a host candidate on the connection's bound port takes a moment; a STUN
/// or TURN server could take longer, and those candidates trickle.
const GATHERING_WAIT: Duration = Duration::from_millis(200);

/// The SFU's candidates go into its first answer, not only trickled after
/// it. A client then knows the SFU's address before the SFU's first
/// connectivity check reaches it; otherwise it first learns the SFU as a
/// peer-reflexive candidate from that check, and pion- and webrtc-rs-based
/// clients wait a second before they use such a pair. Candidates gathered
/// before the answer is sent are held so they never overtake it.
#[derive(Default)]
struct FirstCandidates {
    gathered: tokio::sync::Notify,
    done: AtomicBool,
    /// `Some` until the first answer is out.
    held: Mutex<Option<Vec<RTCIceCandidateInit>>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(mut init) => {
                if let Some(endpoint) = &self.endpoint {
                    init.candidate = endpoint.public(&init.candidate);
                }
                if let Some(held) = self.candidates.held.lock().unwrap().as_mut() {
                    held.push(init);
                    return;
                }
                let _ = self.events.send(PeerEvent::IceCandidate(init));
            }
            Err(e) => debug!("local candidate not serialisable: {e}"),
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.candidates.done.store(true, Ordering::Release);
            self.candidates.gathered.notify_waiters();
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.pc_events.send(PcEvent::Track(track));
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.pc_events.send(PcEvent::State(state));
    }
}

/// Packets kept per outgoing video stream to answer NACKs: about 1.1 s of
/// 1.2 Mbit/s video, 0.55 s at 2.5 Mbit/s. libwebrtc keeps max(1 s, 3 RTT);
/// a retransmission later than that arrives after the receiver has given
/// the frame up. Each kept packet costs its header and extensions per
/// receiver, so this buffer was most of a participant's memory: webrtc's
/// default of 1024 cost 4.2 MB per participant in meeting-10, 256 cost
/// 2.7 MB (heaptrack: 9.5 of 23 MB of heap were these buffers).
const NACK_BUFFER: u16 = 128;

/// webrtc's default chain (NACK both ways, receiver-side TWCC, sender and
/// receiver reports, simulcast header extensions), with a smaller NACK buffer.
fn interceptors(me: &mut MediaEngine, estimate: Option<Estimate>) -> Result<Registry, SfuError> {
    use rtc::interceptor::{
        CongestionControlBuilder, NackGeneratorBuilder, NackResponderBuilder, TwccSenderBuilder,
    };
    use rtc::peer_connection::configuration::interceptor_registry as chain;
    use rtc::rtp_transceiver::rtp_sender::RTCPFeedback;
    for parameter in ["", "pli"] {
        me.register_feedback(
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: parameter.to_owned(),
            },
            RtpCodecKind::Video,
        );
    }
    chain::configure_simulcast_extension_headers(me)?;
    let registry = Registry::new()
        .with(
            chain::Slot::NackResponder,
            NackResponderBuilder::new().with_size(NACK_BUFFER).build(),
        )
        .with(
            chain::Slot::NackGenerator,
            NackGeneratorBuilder::new().build(),
        );
    let registry = chain::configure_twcc_receiver_only(registry, me)?;
    // Send-side estimation without a pacer: the SFU forwards what publishers
    // paced already, and the allocation keeps each receiver within its
    // estimate by choosing layers.
    let registry = match estimate {
        Some(estimate) => registry
            .with(
                chain::Slot::CongestionControl,
                CongestionControlBuilder::new(Reporting::new(estimate)).build(),
            )
            .with(chain::Slot::TwccSender, TwccSenderBuilder::new().build()),
        None => registry,
    };
    Ok(chain::configure_rtcp_reports(registry))
}

fn media_engine(estimate: Option<Estimate>) -> Result<(MediaEngine, Registry), SfuError> {
    let mut me = MediaEngine::default();
    // Opus, VP8, VP9, H.264 (and RTX for each video codec).
    me.register_default_codecs()?;
    me.register_header_extension(
        RTCRtpHeaderExtensionCapability {
            uri: crate::forward::AUDIO_LEVEL_URI.to_owned(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    let registry = interceptors(&mut me, estimate)?;
    // After the default chain, so PLI/FIR reach the application as well.
    let registry = registry.with(Slot::from(14_000), KeyframeRequestTap::default());
    // Wire-ward of the receiver reports (10_000), which it edits.
    let registry = registry.with(Slot::from(9_500), crate::simulcast::KeepRidTags::default());
    Ok((me, registry))
}

async fn build_pc(
    config: &SfuConfig,
    port: u16,
    handler: Arc<Handler>,
    estimate: &Estimate,
) -> Result<Arc<dyn PeerConnection>, SfuError> {
    let endpoint = handler.endpoint.clone();
    let estimate = config.bandwidth_estimation.then(|| estimate.clone());
    let (media_engine, registry) = media_engine(estimate)?;
    // No mDNS: a server has no use for .local names (a browser hiding behind
    // one is found by its connectivity checks), and opening the multicast
    // socket fails with ENODEV where there is no multicast route, as in many
    // containers: every join was refused there.
    let mut settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_answering_dtls_role(rtc::peer_connection::transport::RTCDtlsRole::Server);
    if config.ice_ip.is_loopback() {
        settings = settings.with_include_loopback_candidate(true);
    }
    if let Some(public) = config.public_ip {
        settings = settings.with_nat_1to1_ips(vec![public.to_string()], RTCIceCandidateType::Host);
    }
    if let Some(endpoint) = &endpoint {
        // Known before the connection exists, so the mux can route its
        // connectivity checks to it.
        let (ufrag, pwd) = endpoint.credentials();
        settings = settings.with_ice_credentials(ufrag, pwd);
    }
    let rtc_config = RTCConfigurationBuilder::new()
        .with_bundle_policy(RTCBundlePolicy::MaxBundle)
        .build();
    let mut builder = PeerConnectionBuilder::new();
    if let Some(runtime) = endpoint.as_ref().and_then(|e| e.runtime()) {
        builder = builder.with_runtime(runtime);
    }
    let pc = builder
        .with_configuration(rtc_config)
        .with_media_engine(media_engine)
        .with_setting_engine(settings.build())
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec![SocketAddr::new(config.ice_ip, port)])
        .build()
        .await?;
    Ok(Arc::new(pc))
}

impl FirstCandidates {
    /// Until gathering is complete, or `limit` has passed.
    async fn wait(&self, limit: Duration) {
        let gathered = self.gathered.notified();
        if self.done.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(limit, gathered).await;
    }
}

/// Builds a participant's peer connection on a free port and starts the task
/// that reacts to its events.
pub(crate) async fn connect(
    sfu: &Arc<Sfu>,
    room: &Arc<Room>,
    info: ParticipantInfo,
    events: mpsc::UnboundedSender<PeerEvent>,
) -> Result<Arc<Participant>, SfuError> {
    let (pc_tx, pc_rx) = mpsc::unbounded_channel();
    let candidates = Arc::new(FirstCandidates {
        held: Mutex::new(Some(Vec::new())),
        ..Default::default()
    });
    let endpoint = sfu.mux.as_ref().map(|m| m.endpoint());
    let handler = Arc::new(Handler {
        pc_events: pc_tx,
        events: events.clone(),
        candidates: candidates.clone(),
        endpoint: endpoint.clone(),
    });
    let estimate = Estimate::default();
    let own_uplink = info.downlink && sfu.config.own_uplink;
    let mut last_err = None;
    let mut built = None;
    let (uplink_tx, uplink_rx) = mpsc::unbounded_channel();
    let uplink = match &sfu.mux {
        Some(mux) if own_uplink => {
            let certificate = sfu.certificate()?;
            let timeout = sfu.config.disconnect_timeout;
            Some(mux.attach(|attachment| Uplink::new(attachment, certificate, uplink_tx, timeout)))
        }
        _ => None,
    };
    let endpoint = if uplink.is_some() { None } else { endpoint };
    if uplink.is_some() {
        // No peer connection to build.
    } else if endpoint.is_some() {
        // The driver binds a port of its own, any one; the mux tells clients
        // the shared port instead.
        match build_pc(&sfu.config, 0, handler.clone(), &estimate).await {
            Ok(pc) => built = Some((pc, 0)),
            Err(e) => last_err = Some(e),
        }
    }
    // Else a port of its own from the range.
    let attempts = if endpoint.is_some() || uplink.is_some() {
        0
    } else {
        sfu.ports.span().min(64)
    };
    for _ in 0..attempts {
        let Some(port) = sfu.ports.take() else { break };
        match build_pc(&sfu.config, port, handler.clone(), &estimate).await {
            Ok(pc) => {
                built = Some((pc, port));
                break;
            }
            Err(e) => {
                // Most likely the port is held by another process: try the next.
                debug!(port, "peer connection not built: {e}");
                sfu.ports.release(port);
                last_err = Some(e);
            }
        }
    }
    let built = match (built, &uplink) {
        (Some((pc, port)), _) => Some((Some(pc), port)),
        (None, Some(_)) => Some((None, 0)),
        (None, None) => None,
    };
    let Some((pc, port)) = built else {
        warn!("no peer connection could be built: {last_err:?}");
        return Err(last_err.unwrap_or(SfuError::NoPort {
            min: sfu.config.udp_port_min,
            max: sfu.config.udp_port_max,
        }));
    };
    let downlink = match (&sfu.mux, info.downlink) {
        (Some(mux), true) => {
            let estimate = sfu.config.bandwidth_estimation.then(|| estimate.clone());
            let certificate = sfu.certificate()?;
            Some(mux.attach(|attachment| Downlink::new(attachment, certificate, estimate)))
        }
        (None, true) => return Err(SfuError::DownlinkNeedsMux),
        _ => None,
    };
    let p = Arc::new_cyclic(|me| Participant {
        me: me.clone(),
        candidates,
        id: new_id(),
        info,
        room: Arc::downgrade(room),
        pc,
        uplink,
        endpoint,
        events,
        negotiation: tokio::sync::Mutex::new(Negotiation::default()),
        downlink,
        // The SFU offers its downlink whenever it has something to send.
        down: tokio::sync::Mutex::new(Negotiation {
            started: true,
            ..Negotiation::default()
        }),
        muted: Mutex::new((false, false)),
        audio_blocked: Arc::new(AtomicBool::new(false)),
        port,
        sfu: Arc::downgrade(sfu),
        closed: AtomicBool::new(false),
        leaving: AtomicBool::new(false),
        state: AtomicU8::new(RTCPeerConnectionState::New as u8),
        estimate,
        backoff: Mutex::new(Backoff::default()),
    });
    tokio::spawn(pc_event_loop(Arc::downgrade(&p), pc_rx));
    tokio::spawn(uplink_event_loop(Arc::downgrade(&p), uplink_rx));
    Ok(p)
}

fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..10)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

async fn pc_event_loop(p: Weak<Participant>, mut rx: mpsc::UnboundedReceiver<PcEvent>) {
    while let Some(evt) = rx.recv().await {
        let Some(p) = p.upgrade() else { return };
        let Some(room) = p.room.upgrade() else { return };
        match evt {
            PcEvent::Track(track) => room.publish(&p, track).await,
            PcEvent::State(state) => {
                p.state.store(state as u8, Ordering::Relaxed);
                debug!(participant = %p.id, %state, "connection state");
                match state {
                    RTCPeerConnectionState::Failed => {
                        room.leave(&p.id, "connection failed").await;
                    }
                    RTCPeerConnectionState::Disconnected => {
                        let timeout = p.sfu.upgrade().map(|s| s.config.disconnect_timeout);
                        let weak = Arc::downgrade(&p);
                        tokio::spawn(async move {
                            tokio::time::sleep(timeout.unwrap_or_default()).await;
                            if let Some(p) = weak.upgrade()
                                && p.state.load(Ordering::Relaxed)
                                    == RTCPeerConnectionState::Disconnected as u8
                                && let Some(room) = p.room.upgrade()
                            {
                                room.leave(&p.id, "connection lost").await;
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// What the participant's own uplink reports: tracks to publish, and
/// whether the connection is up.
async fn uplink_event_loop(p: Weak<Participant>, mut rx: mpsc::UnboundedReceiver<UplinkEvent>) {
    while let Some(evt) = rx.recv().await {
        let Some(p) = p.upgrade() else { return };
        let Some(room) = p.room.upgrade() else { return };
        match evt {
            UplinkEvent::Track(track) => {
                let link = p.uplink.as_ref().map(Arc::downgrade).unwrap_or_default();
                let track = Published::from_uplink(&p, link, track);
                room.publish_track(&p, track).await;
            }
            UplinkEvent::Connected => {
                p.state
                    .store(RTCPeerConnectionState::Connected as u8, Ordering::Relaxed);
                debug!(participant = %p.id, "uplink connected");
            }
            UplinkEvent::Lost(why) => {
                debug!(participant = %p.id, why, "uplink lost");
                room.leave(&p.id, why).await;
                return;
            }
        }
    }
}

impl Participant {
    pub(crate) fn send(&self, event: PeerEvent) {
        let _ = self.events.send(event);
    }

    pub fn muted(&self) -> (bool, bool) {
        *self.muted.lock().unwrap()
    }

    /// Chooses the simulcast layer this participant receives of a video
    /// track: the nearest to `quality` that the publisher sends.
    pub fn set_quality(
        &self,
        track_id: &str,
        quality: crate::simulcast::Quality,
    ) -> Result<(), SfuError> {
        let unknown = || SfuError::UnknownTrack(track_id.to_owned());
        let room = self.room.upgrade().ok_or_else(unknown)?;
        let track = room.track(track_id).ok_or_else(unknown)?;
        if track.set_quality(&self.id, quality) {
            Ok(())
        } else {
            Err(unknown())
        }
    }

    /// Records a mute change and tells the others.
    pub fn set_muted(&self, kind: TrackKind, muted: bool) {
        {
            let mut m = self.muted.lock().unwrap();
            let slot = match kind {
                TrackKind::Audio => &mut m.0,
                TrackKind::Video => &mut m.1,
            };
            if *slot == muted {
                return;
            }
            *slot = muted;
        }
        if kind == TrackKind::Audio && !muted {
            self.audio_blocked.store(false, Ordering::Relaxed);
        }
        if let Some(room) = self.room.upgrade() {
            room.muted_changed(&self.id, kind, muted);
        }
    }

    /// A moderator mutes this participant's microphone: the SFU stops
    /// forwarding it, the participant is asked to mute, everyone is told.
    /// The participant may unmute themselves again (as in most meeting
    /// products); until then nothing of their audio reaches anyone.
    pub fn force_mute(&self, by: &str) {
        self.audio_blocked.store(true, Ordering::Relaxed);
        self.send(PeerEvent::MutedByModerator {
            by: by.to_owned(),
            kind: TrackKind::Audio,
        });
        self.set_muted(TrackKind::Audio, true);
    }

    /// Whether the peer connection is up.
    pub fn is_connected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == RTCPeerConnectionState::Connected as u8
    }

    /// The client's offer. The answer comes back as [`PeerEvent::Answer`],
    /// in order with any offer the SFU makes next.
    pub async fn handle_offer(&self, sdp: String) -> Result<(), SfuError> {
        if let Some(uplink) = &self.uplink {
            let answer = uplink
                .answer(&sdp)
                .map_err(|e| SfuError::BadSdp(e.to_string()))?;
            self.send(PeerEvent::Answer(answer));
            return Ok(());
        }
        let pc = self.webrtc()?;
        let offer =
            RTCSessionDescription::offer(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let mut n = self.negotiation.lock().await;
        if n.awaiting_answer {
            // Glare: the SFU's offer wins; the client rolls back and answers it.
            debug!(participant = %self.id, "client offer ignored during glare");
            return Ok(());
        }
        pc.set_remote_description(offer)
            .await
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        for c in std::mem::take(&mut n.early_candidates) {
            if let Err(e) = pc.add_ice_candidate(c).await {
                // No request to answer with an error any more; the others
                // of the batch still count.
                warn!(participant = %self.id, "early candidate refused: {e}");
            }
        }
        let answer = pc.create_answer(None).await?;
        pc.set_local_description(answer).await?;
        if !n.started {
            self.candidates.wait(GATHERING_WAIT).await;
        }
        let sdp = pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .unwrap_or_default();
        self.send(PeerEvent::Answer(self.public(sdp)));
        if let Some(held) = self.candidates.held.lock().unwrap().take() {
            // Most are in the answer already; a duplicate is harmless.
            for c in held {
                self.send(PeerEvent::IceCandidate(c));
            }
        }
        n.started = true;
        if n.pending {
            self.offer_locked(&mut n, Leg::Uplink);
        }
        Ok(())
    }

    /// The client's answer to the SFU's offer.
    pub async fn handle_answer(&self, sdp: String) -> Result<(), SfuError> {
        let answer =
            RTCSessionDescription::answer(sdp).map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let mut n = self.negotiation.lock().await;
        if !n.awaiting_answer {
            return Err(SfuError::BadSdp("no offer is awaiting an answer".into()));
        }
        self.webrtc()?
            .set_remote_description(answer)
            .await
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        self.answered(&mut n, Leg::Uplink);
        Ok(())
    }

    /// The client's answer to the SFU's downlink offer.
    pub async fn handle_downlink_answer(&self, sdp: String) -> Result<(), SfuError> {
        let Some(link) = &self.downlink else {
            return Err(SfuError::BadSdp("this participant has no downlink".into()));
        };
        let answer = confer_transport::sdp::parse_answer(&sdp)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        let mut n = self.down.lock().await;
        if !n.awaiting_answer {
            return Err(SfuError::BadSdp(
                "no downlink offer is awaiting an answer".into(),
            ));
        }
        let offered: Vec<&str> = n.sections[..n.offered_sections]
            .iter()
            .map(|m| m.mid.as_str())
            .collect();
        let answered: Vec<&str> = answer.media.iter().map(|m| m.mid.as_str()).collect();
        if offered != answered {
            return Err(SfuError::BadSdp(format!(
                "the answer's sections {answered:?} are not the offer's {offered:?}"
            )));
        }
        link.answer(&answer)
            .map_err(|e| SfuError::BadSdp(e.to_string()))?;
        self.answered(&mut n, Leg::Downlink);
        Ok(())
    }

    /// After an answer on `leg`: its receivers start, and what changed
    /// meanwhile is offered.
    fn answered(&self, n: &mut Negotiation, leg: Leg) {
        n.awaiting_answer = false;
        n.offers_answered = n.offers_made;
        for (r, needs, _) in &n.receivers {
            if *needs <= n.offers_answered {
                r.negotiated();
            }
        }
        if n.pending {
            self.offer_locked(n, leg);
        }
    }

    pub async fn add_ice_candidate(&self, candidate: RTCIceCandidateInit) -> Result<(), SfuError> {
        if candidate.candidate.is_empty() {
            return Ok(()); // end-of-candidates
        }
        let Some(pc) = &self.pc else {
            // ICE-lite: the client's checks find the way; its candidates
            // are only read for their syntax.
            let raw = candidate.candidate.trim_start_matches("candidate:");
            rtc::ice::candidate::unmarshal_candidate(raw)
                .map_err(|e| SfuError::BadCandidate(e.to_string()))?;
            return Ok(());
        };
        let mut n = self.negotiation.lock().await;
        if pc.remote_description().await.is_none() {
            // Checked now, so a bad one still gets its error.
            let raw = candidate.candidate.trim_start_matches("candidate:");
            rtc::ice::candidate::unmarshal_candidate(raw)
                .map_err(|e| SfuError::BadCandidate(e.to_string()))?;
            if n.early_candidates.len() >= MAX_EARLY_CANDIDATES {
                return Err(SfuError::BadCandidate(format!(
                    "more than {MAX_EARLY_CANDIDATES} candidates before an offer"
                )));
            }
            n.early_candidates.push(candidate);
            return Ok(());
        }
        drop(n);
        pc.add_ice_candidate(candidate)
            .await
            .map_err(|e| SfuError::BadCandidate(e.to_string()))
    }

    /// Asks for an offer with what changed: made at once if it may be, else
    /// by a task once the answer to the last one is in and the wait
    /// between offers is over.
    fn offer_locked(&self, n: &mut Negotiation, leg: Leg) {
        n.pending = true;
        if !n.started || n.awaiting_answer || n.scheduled {
            return;
        }
        let now = Instant::now();
        let at = n
            .last_offer
            .map_or(now, |last| last + offer_interval(n.receivers.len()))
            .max(now + OFFER_SETTLE);
        n.scheduled = true;
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let Some(me) = me.upgrade() else {
                return;
            };
            let negotiation = match leg {
                Leg::Uplink => &me.negotiation,
                Leg::Downlink => &me.down,
            };
            let mut n = negotiation.lock().await;
            n.scheduled = false;
            me.offer_now(&mut n, leg).await;
        });
    }

    async fn offer_now(&self, n: &mut Negotiation, leg: Leg) {
        if !n.pending || !n.started || n.awaiting_answer || self.closed.load(Ordering::Acquire) {
            return;
        }
        n.pending = false;
        n.last_offer = Some(Instant::now());
        if let (Leg::Downlink, Some(link)) = (leg, &self.downlink) {
            n.offers_made += 1;
            n.awaiting_answer = true;
            n.offered_sections = n.sections.len();
            let sdp = link.offer(n.offers_made, &n.sections);
            self.send(PeerEvent::DownlinkOffer(sdp));
            return;
        }
        let Some(pc) = &self.pc else { return };
        let offer = match pc.create_offer(None).await {
            Ok(o) => o,
            Err(e) => {
                warn!(participant = %self.id, "offer not created: {e}");
                return;
            }
        };
        if let Err(e) = pc.set_local_description(offer).await {
            warn!(participant = %self.id, "offer not applied: {e}");
            return;
        }
        let sdp = pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .unwrap_or_default();
        n.offers_made += 1;
        n.awaiting_answer = true;
        self.send(PeerEvent::Offer(self.public(sdp)));
    }

    /// Starts sending a published track to this participant.
    pub(crate) async fn subscribe(self: &Arc<Self>, track: &Arc<Published>) {
        if track.publisher == self.id || self.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(link) = &self.downlink {
            return self.subscribe_downlink(link, track).await;
        }
        let mut n = self.negotiation.lock().await;
        if n.receivers.iter().any(|(_, _, id)| *id == track.info.id) {
            return;
        }
        let out_ssrc: u32 = rand::random();
        let kind = match track.info.kind {
            TrackKind::Audio => RtpCodecKind::Audio,
            TrackKind::Video => RtpCodecKind::Video,
        };
        // The receiver groups tracks by stream id: one stream per publisher.
        let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            track.publisher.clone(),
            track.info.id.clone(),
            track.info.id.clone(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(out_ssrc),
                    ..Default::default()
                },
                codec: track.codec.clone(),
                ..Default::default()
            }],
        )));
        // A new sendonly transceiver each time: add_track would reuse the
        // transceiver the client publishes on, which it set to sendonly.
        let init = RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Sendonly,
            streams: vec![track.publisher.clone()],
            send_encodings: Vec::new(),
        };
        let Some(pc) = &self.pc else { return };
        let added = pc
            .add_transceiver_from_track(local.clone() as Arc<dyn TrackLocal>, Some(init))
            .await;
        let sender = match added {
            Ok(t) => match t.sender().await {
                Ok(Some(s)) => s,
                other => {
                    warn!(participant = %self.id, track = %track.info.id, "transceiver without sender: {:?}", other.err());
                    return;
                }
            },
            Err(e) => {
                warn!(participant = %self.id, track = %track.info.id, "track not added: {e}");
                return;
            }
        };
        let receiver = track.add_receiver(&self.id, Output::WebRtc { local, sender }, out_ssrc);
        let needs = n.offers_made + 1;
        n.receivers.push((receiver, needs, track.info.id.clone()));
        self.offer_locked(&mut n, Leg::Uplink);
    }

    /// As [`Self::subscribe`], on its own downlink: a new section.
    async fn subscribe_downlink(&self, link: &Arc<Downlink>, track: &Arc<Published>) {
        let mut n = self.down.lock().await;
        if n.receivers.iter().any(|(_, _, id)| *id == track.info.id) {
            return;
        }
        let (ssrc, rtx_ssrc): (u32, u32) = (rand::random(), rand::random());
        // The receiver groups tracks by stream id: one stream per publisher.
        let Some(mut section) = downlink::section(
            String::new(),
            &track.codec,
            ssrc,
            rtx_ssrc,
            &track.publisher,
            &track.info.id,
        ) else {
            warn!(participant = %self.id, track = %track.info.id, codec = %track.codec.mime_type,
                "codec not forwarded on a downlink");
            return;
        };
        // Only a section the client knows is inactive: taking over one it
        // still receives on would change its track's stream without a
        // `track` event, and the page would never show the newcomer.
        let answered = n.offers_answered;
        let sections = &n.sections;
        let reusable = n
            .idle
            .iter()
            .position(|&(i, needs)| needs <= answered && sections[i].kind == section.kind);
        match reusable {
            Some(at) => {
                let (i, _) = n.idle.swap_remove(at);
                section.mid = std::mem::take(&mut n.sections[i].mid);
                debug!(participant = %self.id, track = %track.info.id, mid = %section.mid,
                    "downlink section reused");
                n.sections[i] = section;
            }
            None => {
                section.mid = n.sections.len().to_string();
                n.sections.push(section);
            }
        }
        let output = Output::Downlink {
            link: link.clone(),
            rtx_ssrc,
        };
        let receiver = track.add_receiver(&self.id, output, ssrc);
        let needs = n.offers_made + 1;
        n.receivers.push((receiver, needs, track.info.id.clone()));
        self.offer_locked(&mut n, Leg::Downlink);
    }

    /// Stops sending a track (its publisher left or stopped it).
    pub(crate) async fn unsubscribe(&self, track: &Published) {
        if self.leaving.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire) {
            // Going too: stop forwarding, without waiting on a negotiation
            // that may be in flight.
            track.remove_receiver(&self.id);
            return;
        }
        let (negotiation, leg) = match &self.downlink {
            Some(_) => (&self.down, Leg::Downlink),
            None => (&self.negotiation, Leg::Uplink),
        };
        let mut n = negotiation.lock().await;
        let Some(i) = n
            .receivers
            .iter()
            .position(|(_, _, id)| *id == track.info.id)
        else {
            return;
        };
        let (receiver, _, _) = n.receivers.remove(i);
        track.remove_receiver(&self.id);
        match &receiver.output {
            Output::Downlink { link, .. } => {
                link.forget(&receiver.ssrcs());
                // The section stays, inactive (sections keep their order),
                // until a new track takes it over.
                if let Some(i) = n
                    .sections
                    .iter()
                    .position(|m| m.track == track.info.id && m.sending)
                {
                    n.sections[i].sending = false;
                    let carried_by = n.offers_made + 1;
                    n.idle.push((i, carried_by));
                }
            }
            Output::WebRtc { sender, .. } => {
                if self.closed.load(Ordering::Acquire) {
                    return;
                }
                if let Some(pc) = &self.pc
                    && let Err(e) = pc.remove_track(sender).await
                {
                    debug!(participant = %self.id, "remove_track: {e}");
                }
            }
        }
        self.offer_locked(&mut n, leg);
    }

    /// Header extensions the client negotiated for what it sends, `(uri, id)`.
    pub(crate) async fn remote_extensions(&self) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = Vec::new();
        let Some(pc) = &self.pc else {
            return out;
        };
        for r in pc.get_receivers().await {
            if let Ok(params) = r.get_parameters().await {
                for e in params.rtp_parameters.header_extensions {
                    if !out.iter().any(|(u, _)| *u == e.uri) {
                        out.push((e.uri, e.id));
                    }
                }
            }
        }
        out
    }

    /// Its webrtc peer connection, which a participant on an uplink of our
    /// own does not have.
    fn webrtc(&self) -> Result<&Arc<dyn PeerConnection>, SfuError> {
        self.pc.as_ref().ok_or_else(|| {
            SfuError::BadSdp("this participant publishes without a peer connection".into())
        })
    }

    /// A description as the client must see it (see [`Endpoint::public`]).
    fn public(&self, sdp: String) -> String {
        match &self.endpoint {
            Some(endpoint) => endpoint.public(&sdp),
            None => sdp,
        }
    }

    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(pc) = &self.pc
            && let Err(e) = pc.close().await
        {
            debug!(participant = %self.id, "close: {e}");
        }
        if let Some(uplink) = &self.uplink {
            uplink.close();
        }
        if let Some(sfu) = self.sfu.upgrade() {
            sfu.ports.release(self.port);
        }
        info!(participant = %self.id, "peer connection closed");
    }
}

impl Participant {
    /// Removes this participant from its room (idempotent).
    pub async fn leave(&self, reason: &str) {
        if let Some(room) = self.room.upgrade() {
            room.leave(&self.id, reason).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_to_large_rooms_are_spaced_by_their_size() {
        // A meeting of ten: as often as small rooms.
        assert_eq!(offer_interval(18), Duration::from_millis(250));
        // An all-hands of a hundred, audio only: twice as far apart.
        assert_eq!(offer_interval(99), Duration::from_millis(495));
        // Never more than a second between offers.
        assert_eq!(offer_interval(100_000), Duration::from_secs(1));
    }
}
