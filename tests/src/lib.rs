//! End-to-end test harness: a Confer server in this process, and client
//! peers that speak the documented signaling protocol over a real WebSocket
//! and real WebRTC (ICE, DTLS-SRTP) over loopback.
//!
//! Every RTP payload a client sends is self-describing — sender index, kind
//! and a counter, then bytes derived from them — so receivers can check that
//! what arrives is intact, complete and in order.

use anyhow::{Context, bail};
use bytes::Bytes;
use confer_sfu::{Role, Sfu};
use confer_signaling::media::Media as Rooms;
use confer_signaling::nodes::Nodes;
use confer_signaling::token::{Claims, JoinKind};
use confer_signaling::{AppState, Config};
use futures_util::{SinkExt, StreamExt};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSdpType, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};

pub mod bottleneck;
pub mod garage;
pub mod lossy;
pub mod radicale;

/// Waits until `cond` holds, polling; fails with `what` after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONFER_LOG")
                .unwrap_or_else(|_| "warn,rtc=error,webrtc=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A Confer running in this test process on 127.0.0.1, in demo mode.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl TestServer {
    pub async fn start() -> anyhow::Result<TestServer> {
        Self::start_with(|_| {}).await
    }

    /// Starts with a test configuration that `adjust` may change: OS-chosen
    /// media ports, a fresh data dir, the local schedule.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> anyhow::Result<TestServer> {
        let mut config = Config::load(None, std::iter::empty())?;
        config.sfu.udp_port = 0;
        config.sfu.udp_port_min = 0;
        config.sfu.udp_port_max = 0;
        config.sfu.empty_room_grace = Duration::from_secs(1);
        config.data_dir =
            std::env::temp_dir().join(format!("confer-test-{:016x}", rand::random::<u64>()));
        adjust(&mut config);
        config.validate()?;
        let state = AppState::new(config).map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(confer_signaling::serve(listener, state.clone(), async {
            let _ = rx.await;
        }));
        Ok(TestServer {
            addr,
            state,
            _shutdown: tx,
        })
    }

    /// The SFU in this process.
    pub fn sfu(&self) -> &Arc<Sfu> {
        match &self.state.media {
            Rooms::Local(sfu) => sfu,
            Rooms::Remote(_) => panic!("this test server's rooms are on SFU nodes"),
        }
    }

    /// A call token for `room`: admitted without a schedule check.
    pub fn token(&self, name: &str, room: &str) -> String {
        self.token_with(name, room, confer_signaling::token::now_secs() + 600)
    }

    pub fn token_with(&self, name: &str, room: &str, exp: u64) -> String {
        self.mint(Claims {
            exp,
            ..claims(name, room, JoinKind::Call)
        })
    }

    pub fn mint(&self, claims: Claims) -> String {
        self.state
            .tokens
            .mint(&claims)
            .expect("demo mode mints tokens")
    }
}

/// The secret test SFU nodes and the signaling that drives them share.
pub const SPLIT_SECRET: &str = "a-test-secret-between-signaling-and-sfu";

/// An SFU node (`confer sfu`) in this test process, on a runtime of its
/// own, so that [`TestNode::kill`] is its process dying: every task and
/// socket gone at once.
pub struct TestNode {
    pub url: String,
    pub sfu: Arc<Sfu>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestNode {
    pub fn start() -> anyhow::Result<TestNode> {
        let mut config = Config::default();
        config.sfu.udp_port = 0;
        config.sfu.udp_port_min = 0;
        config.sfu.udp_port_max = 0;
        config.sfu.empty_room_grace = Duration::from_secs(1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        // Its media socket belongs to the node's runtime, and goes with it.
        let sfu = {
            let _in_runtime = runtime.enter();
            Sfu::new(config.sfu)?
        };
        let app = confer_signaling::sfu_node::router(sfu.clone(), SPLIT_SECRET);
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("a listener");
            let _ = axum::serve(listener, app).await;
        });
        Ok(TestNode {
            url,
            sfu,
            runtime: Some(runtime),
        })
    }

    pub fn kill(mut self) {
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

impl TestServer {
    /// `confer signaling` in this process, with its rooms on `nodes`;
    /// returns once it is connected to all of them.
    pub async fn start_split(
        nodes: &[&TestNode],
        adjust: impl FnOnce(&mut Config),
    ) -> anyhow::Result<TestServer> {
        let mut config = Config::load(None, std::iter::empty())?;
        config.data_dir =
            std::env::temp_dir().join(format!("confer-test-{:016x}", rand::random::<u64>()));
        config.split.sfu_nodes = nodes.iter().map(|n| n.url.clone()).collect();
        config.split.secret = Some(SPLIT_SECRET.into());
        config.recording.recorders = confer_signaling::config::RecorderMode::Remote;
        config.recording.recorder_secret = Some(RECORDER_SECRET.into());
        adjust(&mut config);
        let remote = Nodes::connect(config.split.sfu_nodes.clone(), SPLIT_SECRET.into());
        let state = AppState::with_media(config, Rooms::Remote(remote.clone()))
            .map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(confer_signaling::serve(listener, state.clone(), async {
            let _ = rx.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !remote.all_up() {
            if Instant::now() > deadline {
                bail!("SFU nodes not connected: {:?}", remote.status().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(TestServer {
            addr,
            state,
            _shutdown: tx,
        })
    }

    /// The SFU nodes, as signaling sees them.
    pub fn nodes(&self) -> &Arc<Nodes> {
        match &self.state.media {
            Rooms::Remote(nodes) => nodes,
            Rooms::Local(_) => panic!("this test server runs its own SFU"),
        }
    }
}

/// The secret test recorder processes connect with.
pub const RECORDER_SECRET: &str = "a recorder secret of 32 characters!";

/// A recorder process's work loop for `server`, storing into `store_dir`,
/// with its spool in `spool` and segments of `segment_secs`; and the
/// sender that shuts it down.
pub fn recorder_worker(
    server: &TestServer,
    store_dir: &std::path::Path,
    spool: &std::path::Path,
    segment_secs: u64,
) -> (
    impl std::future::Future<Output = ()> + Send + 'static,
    tokio::sync::watch::Sender<bool>,
) {
    use confer_recorder::worker::{self, WorkerSettings};
    let settings = WorkerSettings {
        signaling: format!("http://{}", server.addr),
        secret: RECORDER_SECRET.into(),
        name: "test-recorder".into(),
        capacity: 2,
        bind: "127.0.0.1".parse().unwrap(),
    };
    let recording = confer_recorder::recording::Settings {
        segment: Duration::from_secs(segment_secs),
        spool: spool.to_owned(),
        ..Default::default()
    };
    let store: Arc<dyn confer_recorder::Store> =
        Arc::new(confer_recorder::LocalStore::new(store_dir.to_owned()));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    (worker::run(settings, store, recording, stopping), stop)
}

/// Claims for user `user-{name}`, role participant, valid ten minutes.
pub fn claims(name: &str, room: &str, kind: JoinKind) -> Claims {
    Claims {
        sub: format!("user-{name}"),
        name: name.to_owned(),
        room: room.to_owned(),
        role: Role::Participant,
        exp: confer_signaling::token::now_secs() + 600,
        email: None,
        kind,
    }
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

/// A raw signaling connection: JSON in, JSON out.
pub struct Signal {
    pub tx: mpsc::UnboundedSender<Message>,
    pub rx: mpsc::UnboundedReceiver<Value>,
}

impl Signal {
    pub async fn connect(url: &str) -> anyhow::Result<Signal> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut out) = mpsc::unbounded_channel::<Message>();
        let (in_tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = out.recv().await {
                let close = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || close {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if let Message::Text(t) = m
                    && let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                    && in_tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        Ok(Signal { tx, rx })
    }

    pub fn send(&self, v: Value) {
        let _ = self.tx.send(Message::Text(v.to_string().into()));
    }

    pub fn send_raw(&self, text: String) {
        let _ = self.tx.send(Message::Text(text.into()));
    }

    /// The next message of type `ty`, skipping others.
    pub async fn expect(&mut self, ty: &str, within: Duration) -> anyhow::Result<Value> {
        Ok(self.skipping_until(ty, within).await?.1)
    }

    /// The messages before the next one of type `ty`, and that one.
    pub async fn skipping_until(
        &mut self,
        ty: &str,
        within: Duration,
    ) -> anyhow::Result<(Vec<Value>, Value)> {
        let deadline = Instant::now() + within;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(v)) if v["type"] == ty => return Ok((skipped, v)),
                Ok(Some(v)) => skipped.push(v),
                Ok(None) => bail!("connection closed while waiting for {ty:?}"),
                Err(_) => bail!("no {ty:?} message within {within:?}"),
            }
        }
    }
}

/// What one client received from one publisher's track.
#[derive(Default, Debug, Clone)]
pub struct Received {
    /// (RTP sequence number, payload) in arrival order.
    pub packets: Vec<(u16, Bytes)>,
}

type Inbox = Arc<Mutex<HashMap<(String, Kind), Received>>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Audio,
    Video,
}

/// A client peer: joins over signaling, publishes synthetic audio and video,
/// and records everything it receives.
pub struct Client {
    pub name: String,
    pub participant_id: String,
    pub index: u8,
    signal_tx: mpsc::UnboundedSender<Message>,
    pc: Arc<dyn PeerConnection>,
    /// The second connection it receives on, when it joined with a downlink.
    downlink: Option<Arc<dyn PeerConnection>>,
    inbox: Inbox,
    /// Every signaling message received after `joined`, in order.
    pub events: Arc<Mutex<Vec<Value>>>,
    connected: Arc<Mutex<bool>>,
    negotiation: Arc<Negotiation>,
    dropped_video: Arc<AtomicUsize>,
    /// The rate of a [`LastHop::Bottleneck`].
    link_rate: Arc<AtomicU64>,
}

/// The client's side of offer/answer: it is the polite peer.
#[derive(Default)]
struct Negotiation {
    /// An offer made but not yet sent: the test releases it when the
    /// server's offer arrives, so that the two cross on the wire.
    held_offer: Mutex<Option<String>>,
    /// How many times the client rolled its own offer back (glare).
    rollbacks: AtomicUsize,
}

struct ClientHandler {
    /// Where its candidates go; none for a downlink, whose ICE-lite server
    /// only answers checks.
    signal: Option<mpsc::UnboundedSender<Message>>,
    inbox: Inbox,
    connected: Arc<Mutex<bool>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let (Some(signal), Ok(c)) = (&self.signal, event.candidate.to_json()) {
            let msg = json!({"type": "candidate", "candidate": c});
            let _ = signal.send(Message::Text(msg.to_string().into()));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        *self.connected.lock().unwrap() = state == RTCPeerConnectionState::Connected;
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let publisher = track.stream_id().await.to_string();
            let kind = match track.kind().await {
                RtpCodecKind::Audio => Kind::Audio,
                _ => Kind::Video,
            };
            while let Some(evt) = track.poll().await {
                match evt {
                    TrackRemoteEvent::OnRtpPacket(p) => {
                        inbox
                            .lock()
                            .unwrap()
                            .entry((publisher.clone(), kind))
                            .or_default()
                            .packets
                            .push((p.header.sequence_number, p.payload));
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }
}

/// Synthetic media: the payload for packet `counter` of `kind` from sender `index`.
pub fn payload(index: u8, kind: Kind, counter: u32) -> Bytes {
    let len = match kind {
        Kind::Audio => 120,
        Kind::Video => 1000,
    };
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&[b'C', index, kind as u8]);
    v.extend_from_slice(&counter.to_be_bytes());
    while v.len() < len {
        v.push((counter as usize).wrapping_add(v.len()).wrapping_mul(31) as u8);
    }
    Bytes::from(v)
}

/// Reads back (index, kind, counter) and checks the rest of the payload.
pub fn check_payload(p: &[u8]) -> Option<(u8, Kind, u32)> {
    if p.len() < 7 || p[0] != b'C' {
        return None;
    }
    let kind = match p[2] {
        0 => Kind::Audio,
        1 => Kind::Video,
        _ => return None,
    };
    let counter = u32::from_be_bytes([p[3], p[4], p[5], p[6]]);
    (payload(p[1], kind, counter) == p).then_some((p[1], kind, counter))
}

/// An offer receiving `m_lines` videos, from a throwaway peer connection:
/// real SDP of a realistic size (a meeting with many participants).
pub async fn recvonly_video_offer(m_lines: usize) -> anyhow::Result<String> {
    let mut me = MediaEngine::default();
    me.register_default_codecs()?;
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_handler(Arc::new(Quiet))
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await?;
    for _ in 0..m_lines {
        pc.add_transceiver_from_kind(
            RtpCodecKind::Video,
            Some(webrtc::rtp_transceiver::RTCRtpTransceiverInit {
                direction: webrtc::rtp_transceiver::RTCRtpTransceiverDirection::Recvonly,
                streams: vec![],
                send_encodings: vec![],
            }),
        )
        .await?;
    }
    let offer = pc.create_offer(None).await?;
    pc.close().await?;
    Ok(offer.sdp)
}

/// Ignores every peer-connection event.
struct Quiet;

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Quiet {}

/// What happens to the packets a test client receives before it sees them
/// (or sends, before the server does).
#[derive(Clone, Copy, Debug, Default)]
pub enum LastHop {
    #[default]
    Clean,
    /// Every n-th video packet is lost once ([`lossy::DropVideo`]).
    DropVideo(u32),
    /// Every n-th video packet it sends is lost once, on the way to the
    /// server ([`lossy::DropVideo::sent`]).
    DropSentVideo(u32),
    /// A link of `bits_per_second` that queues up to `buffer`
    /// ([`bottleneck::Bottleneck`]).
    Bottleneck {
        bits_per_second: u64,
        buffer: Duration,
    },
}

fn client_media_engine(
    hop: LastHop,
    dropped: &Arc<AtomicUsize>,
    link_rate: &Arc<AtomicU64>,
) -> anyhow::Result<(MediaEngine, Registry)> {
    let mut me = MediaEngine::default();
    me.register_default_codecs()?;
    // As browsers offer it, so [`Media::Speaking`] can send levels.
    me.register_header_extension(
        RTCRtpHeaderExtensionCapability {
            uri: confer_sfu::forward::AUDIO_LEVEL_URI.to_owned(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    let registry = register_default_interceptors(Registry::new(), &mut me)?;
    // Nearest the wire, before the NACK generator and the congestion
    // feedback see what arrived.
    let wire = rtc::interceptor::Slot::from(500);
    let registry = match hop {
        LastHop::Clean => registry,
        LastHop::DropVideo(every) => {
            registry.with(wire, lossy::DropVideo::new(every, dropped.clone()))
        }
        LastHop::DropSentVideo(every) => {
            registry.with(wire, lossy::DropVideo::sent(every, dropped.clone()))
        }
        LastHop::Bottleneck {
            bits_per_second,
            buffer,
        } => {
            link_rate.store(bits_per_second, Ordering::Relaxed);
            registry.with(
                wire,
                bottleneck::Bottleneck::new(link_rate.clone(), buffer, dropped.clone()),
            )
        }
    };
    Ok((me, registry))
}

/// A local track publishing `kind` in `codec` (a MIME type) on `ssrc`.
fn local_track(
    name: &str,
    track_id: &str,
    kind: Kind,
    codec: &str,
    ssrc: u32,
) -> Arc<TrackLocalStaticRTP> {
    let (codec_kind, clock_rate, channels) = match kind {
        Kind::Audio => (RtpCodecKind::Audio, 48000, 2),
        Kind::Video => (RtpCodecKind::Video, 90000, 0),
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("{name}-stream"),
        track_id.to_owned(),
        format!("{name} {track_id}"),
        codec_kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec {
                mime_type: codec.into(),
                clock_rate,
                channels,
                ..Default::default()
            },
            ..Default::default()
        }],
    )))
}

/// A video track sent as simulcast layers, `(rid, ssrc)` smallest first.
fn simulcast_track<const N: usize>(
    name: &str,
    track_id: &str,
    layers: [(&str, u32); N],
) -> Arc<TrackLocalStaticRTP> {
    let encodings = layers
        .iter()
        .map(|(rid, ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: (*rid).to_owned(),
                ssrc: Some(*ssrc),
                ..Default::default()
            },
            codec: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec {
                mime_type: "video/VP8".into(),
                clock_rate: 90000,
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("{name}-stream"),
        track_id.to_owned(),
        format!("{name} {track_id}"),
        RtpCodecKind::Video,
        encodings,
    )))
}

/// One simulcast layer being sent.
struct Layer {
    local: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    transceiver: Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>,
    rid: &'static str,
    ssrc: u32,
    frames: Arc<Vec<Vec<u8>>>,
}

impl Client {
    /// Joins `room` as `name`, publishing audio and video if `publish`.
    pub async fn join(
        server: &TestServer,
        name: &str,
        room: &str,
        index: u8,
        publish: bool,
    ) -> anyhow::Result<Client> {
        Self::join_with(server, name, &server.token(name, room), index, publish).await
    }

    /// Joins with a given token (a scheduled meeting, a moderator...).
    pub async fn join_with(
        server: &TestServer,
        name: &str,
        token: &str,
        index: u8,
        publish: bool,
    ) -> anyhow::Result<Client> {
        let video = publish.then_some("video/VP8");
        Self::join_publishing(server, name, token, index, video).await
    }

    /// Joins publishing Opus and video in `video_codec` (e.g. `video/H264`),
    /// or nothing if `None`. The payloads are synthetic (self-describing).
    pub async fn join_publishing(
        server: &TestServer,
        name: &str,
        token: &str,
        index: u8,
        video_codec: Option<&str>,
    ) -> anyhow::Result<Client> {
        Self::join_with_media(
            server,
            name,
            token,
            index,
            video_codec,
            Media::Synthetic,
            LastHop::Clean,
        )
        .await
    }

    /// Joins publishing, and loses every `every`-th video packet it
    /// receives (once: a resent copy gets through).
    pub async fn join_dropping_video(
        server: &TestServer,
        name: &str,
        room: &str,
        index: u8,
        every: u32,
    ) -> anyhow::Result<Client> {
        let (video, hop) = (Some("video/VP8"), LastHop::DropVideo(every));
        Self::join_room(server, name, room, index, video, Media::Synthetic, hop).await
    }

    /// Joins publishing audio at the audio level `dbov` holds (and video).
    pub async fn join_speaking(
        server: &TestServer,
        name: &str,
        room: &str,
        index: u8,
        dbov: Arc<AtomicU8>,
    ) -> anyhow::Result<Client> {
        let (video, media) = (Some("video/VP8"), Media::Speaking(dbov));
        Self::join_room(server, name, room, index, video, media, LastHop::Clean).await
    }

    /// Joins publishing nothing, receiving through `hop`.
    pub async fn join_behind(
        server: &TestServer,
        name: &str,
        room: &str,
        index: u8,
        hop: LastHop,
    ) -> anyhow::Result<Client> {
        Self::join_room(server, name, room, index, None, Media::Synthetic, hop).await
    }

    /// [`Client::join_with_media`] with a token for `room`.
    async fn join_room(
        server: &TestServer,
        name: &str,
        room: &str,
        index: u8,
        video_codec: Option<&str>,
        media: Media,
        hop: LastHop,
    ) -> anyhow::Result<Client> {
        let token = server.token(name, room);
        Self::join_with_media(server, name, &token, index, video_codec, media, hop).await
    }

    /// Joins publishing real Opus (a tone) and VP8 (given frames).
    pub async fn join_real(
        server: &TestServer,
        name: &str,
        token: &str,
        index: u8,
        media: Arc<RealMedia>,
    ) -> anyhow::Result<Client> {
        let codec = if media.h264 {
            "video/H264"
        } else {
            "video/VP8"
        };
        Self::join_with_media(
            server,
            name,
            token,
            index,
            Some(codec),
            Media::Real(media),
            LastHop::Clean,
        )
        .await
    }

    /// Joins `room` receiving on a downlink of its own (`docs/signaling.md`)
    /// through `hop`, publishing synthetic audio and VP8 if `publish`; if
    /// not, it makes no first connection at all, only the downlink.
    pub async fn join_downlink(
        server: &TestServer,
        name: &str,
        room: &str,
        index: u8,
        publish: bool,
        hop: LastHop,
    ) -> anyhow::Result<Client> {
        let token = server.token(name, room);
        let video = publish.then_some("video/VP8");
        let media = Media::Synthetic;
        Self::join_with_media_on(server, name, &token, index, video, media, hop, true).await
    }

    async fn join_with_media(
        server: &TestServer,
        name: &str,
        token: &str,
        index: u8,
        video_codec: Option<&str>,
        media: Media,
        hop: LastHop,
    ) -> anyhow::Result<Client> {
        Self::join_with_media_on(server, name, token, index, video_codec, media, hop, false).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn join_with_media_on(
        server: &TestServer,
        name: &str,
        token: &str,
        index: u8,
        video_codec: Option<&str>,
        media: Media,
        hop: LastHop,
        downlink: bool,
    ) -> anyhow::Result<Client> {
        let publish = video_codec.is_some();
        // A viewer on a downlink makes no first connection at all: nothing
        // to send, and its downlink does not wait for it (docs/signaling.md).
        let uplink = publish || !downlink;
        let mut signal = Signal::connect(&server.ws_url()).await?;
        signal.send(json!({"type": "join", "token": token, "downlink": downlink}));
        let joined = signal.expect("joined", Duration::from_secs(10)).await?;
        let participant_id = joined["participant_id"]
            .as_str()
            .context("participant_id")?
            .to_owned();

        let inbox: Inbox = Default::default();
        let connected = Arc::new(Mutex::new(false));
        let handler = Arc::new(ClientHandler {
            signal: Some(signal.tx.clone()),
            inbox: inbox.clone(),
            connected: connected.clone(),
        });
        let dropped_video = Arc::new(AtomicUsize::new(0));
        let link_rate = Arc::new(AtomicU64::new(0));
        let downlink = match downlink {
            true => {
                let handler = Arc::new(ClientHandler {
                    signal: None,
                    inbox: inbox.clone(),
                    connected: Arc::new(Mutex::new(false)),
                });
                let (me, registry) = client_media_engine(hop, &dropped_video, &link_rate)?;
                let pc = client_pc(me, registry, handler, true).await?;
                Some(Arc::new(pc) as Arc<dyn PeerConnection>)
            }
            false => None,
        };
        let (me, registry) = client_media_engine(hop, &dropped_video, &link_rate)?;
        let pc: Arc<dyn PeerConnection> = Arc::new(client_pc(me, registry, handler, false).await?);

        let mut locals = Vec::new();
        let mut layers = Vec::new();
        if publish {
            for kind in [Kind::Audio, Kind::Video] {
                let ssrc: u32 = rand::random();
                let codec = match kind {
                    Kind::Audio => "audio/opus",
                    Kind::Video => video_codec.unwrap_or("video/VP8"),
                };
                let track_id = format!("{name}-{kind:?}").to_lowercase();
                if let (Kind::Video, Media::Real(real)) = (kind, &media)
                    && let Some(small) = &real.small
                {
                    let small_ssrc: u32 = rand::random();
                    let local = simulcast_track(name, &track_id, [("h", small_ssrc), ("f", ssrc)]);
                    let init = webrtc::rtp_transceiver::RTCRtpTransceiverInit {
                        direction: webrtc::rtp_transceiver::RTCRtpTransceiverDirection::Sendonly,
                        streams: vec![],
                        send_encodings: vec![],
                    };
                    let t = pc
                        .add_transceiver_from_track(
                            local.clone() as Arc<dyn TrackLocal>,
                            Some(init),
                        )
                        .await?;
                    let sender = t.sender().await?.context("no sender")?;
                    for (rid, ssrc, frames) in [
                        ("h", small_ssrc, small.clone()),
                        ("f", ssrc, real.vp8.clone()),
                    ] {
                        layers.push(Layer {
                            local: local.clone(),
                            sender: sender.clone(),
                            transceiver: t.clone(),
                            rid,
                            ssrc,
                            frames,
                        });
                    }
                    continue;
                }
                let local = local_track(name, &track_id, kind, codec, ssrc);
                let sender = pc.add_track(local.clone() as Arc<dyn TrackLocal>).await?;
                locals.push((kind, local, sender, ssrc));
            }
        }
        if !publish && uplink {
            // As docs/signaling.md asks of a client with nothing to send.
            pc.add_transceiver_from_kind(
                RtpCodecKind::Audio,
                Some(webrtc::rtp_transceiver::RTCRtpTransceiverInit {
                    direction: webrtc::rtp_transceiver::RTCRtpTransceiverDirection::Recvonly,
                    streams: vec![],
                    send_encodings: vec![],
                }),
            )
            .await?;
        }
        if uplink {
            let offer = pc.create_offer(None).await?;
            pc.set_local_description(offer).await?;
            let sdp = pc
                .local_description()
                .await
                .context("local description")?
                .sdp;
            signal.send(json!({"type": "offer", "sdp": sdp}));
        }

        let events: Arc<Mutex<Vec<Value>>> = Default::default();
        let negotiation = Arc::new(Negotiation::default());
        tokio::spawn(signal_loop(
            signal.rx,
            signal.tx.clone(),
            pc.clone(),
            downlink.clone(),
            events.clone(),
            negotiation.clone(),
        ));
        for (kind, local, sender, ssrc) in locals {
            tokio::spawn(send_media(
                index,
                kind,
                local,
                sender,
                ssrc,
                connected.clone(),
                media.clone(),
            ));
        }
        if let Media::Real(real) = &media {
            for layer in layers {
                tokio::spawn(send_layer(layer, connected.clone(), real.clone()));
            }
        }
        Ok(Client {
            name: name.to_owned(),
            participant_id,
            index,
            signal_tx: signal.tx,
            pc,
            downlink,
            inbox,
            events,
            connected,
            negotiation,
            dropped_video,
            link_rate,
        })
    }

    /// Starts publishing one more synthetic video track (payloads carry
    /// `index`) and makes the offer for it, but holds that offer back until
    /// the server's next offer arrives: then both offers cross, as when two
    /// sides offer at the same moment.
    pub async fn hold_offer_with_video(&self, index: u8) -> anyhow::Result<()> {
        let ssrc: u32 = rand::random();
        let local = local_track(&self.name, "extra-video", Kind::Video, "video/VP8", ssrc);
        let init = webrtc::rtp_transceiver::RTCRtpTransceiverInit {
            direction: webrtc::rtp_transceiver::RTCRtpTransceiverDirection::Sendonly,
            streams: vec![],
            send_encodings: vec![],
        };
        let transceiver = self
            .pc
            .add_transceiver_from_track(local.clone() as Arc<dyn TrackLocal>, Some(init))
            .await?;
        let sender = transceiver.sender().await?.context("no sender")?;
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer).await?;
        let sdp = self.pc.local_description().await.context("offer")?.sdp;
        *self.negotiation.held_offer.lock().unwrap() = Some(sdp);
        tokio::spawn(send_media(
            index,
            Kind::Video,
            local,
            sender,
            ssrc,
            self.connected.clone(),
            Media::Synthetic,
        ));
        Ok(())
    }

    /// How often this client rolled back its own offer because the
    /// server's crossed it.
    pub fn rollbacks(&self) -> usize {
        self.negotiation.rollbacks.load(Ordering::Relaxed)
    }

    /// Changes the rate of its [`LastHop::Bottleneck`] (no effect on other
    /// last hops).
    pub fn set_link_rate(&self, bits_per_second: u64) {
        self.link_rate.store(bits_per_second, Ordering::Relaxed);
    }

    /// How many received packets the last hop dropped (with a bottleneck:
    /// of any kind).
    pub fn dropped_video(&self) -> usize {
        self.dropped_video.load(Ordering::Relaxed)
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.lock().unwrap()
    }

    /// Packets received so far from `publisher`'s track of `kind`.
    pub fn received(&self, publisher: &str, kind: Kind) -> Received {
        self.inbox
            .lock()
            .unwrap()
            .get(&(publisher.to_owned(), kind))
            .cloned()
            .unwrap_or_default()
    }

    /// Publishers (stream ids) this client has received media from.
    pub fn publishers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inbox
            .lock()
            .unwrap()
            .keys()
            .map(|(p, _)| p.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether a signaling event matching `pred` has arrived.
    pub fn saw(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.events.lock().unwrap().iter().any(pred)
    }

    /// Signaling messages of type `ty` received so far.
    pub fn events_of(&self, ty: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["type"] == ty)
            .cloned()
            .collect()
    }

    pub fn send(&self, v: Value) {
        let _ = self.signal_tx.send(Message::Text(v.to_string().into()));
    }

    /// Leaves properly: a `leave` message, then close.
    pub async fn leave(self) {
        self.send(json!({"type": "leave"}));
        let _ = self.signal_tx.send(Message::Close(None));
        let _ = self.pc.close().await;
        if let Some(downlink) = &self.downlink {
            let _ = downlink.close().await;
        }
    }

    /// Vanishes without a word: the media stops and the socket goes silent
    /// but is not closed, as when a laptop lid shuts.
    pub async fn vanish(self) -> mpsc::UnboundedSender<Message> {
        let _ = self.pc.close().await;
        if let Some(downlink) = &self.downlink {
            let _ = downlink.close().await;
        }
        self.signal_tx
    }
}

/// A client's peer connection; `downlink` answers as browsers do (the DTLS
/// client) where webrtc-rs would be the server for an ICE-lite offer.
async fn client_pc(
    me: MediaEngine,
    registry: Registry,
    handler: Arc<ClientHandler>,
    downlink: bool,
) -> anyhow::Result<impl PeerConnection> {
    let mut settings = SettingEngineBuilder::new()
        .with_include_loopback_candidate(true)
        // As browsers do: no 1 s wait before nominating a pair found by
        // the server's check overtaking its candidate.
        .with_prflx_acceptance_min_wait(Some(std::time::Duration::ZERO));
    if downlink {
        settings =
            settings.with_answering_dtls_role(rtc::peer_connection::transport::RTCDtlsRole::Client);
    }
    Ok(PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_interceptor_registry(registry)
        .with_setting_engine(settings.build())
        .with_handler(handler)
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await?)
}

async fn signal_loop(
    mut rx: mpsc::UnboundedReceiver<Value>,
    tx: mpsc::UnboundedSender<Message>,
    pc: Arc<dyn PeerConnection>,
    downlink: Option<Arc<dyn PeerConnection>>,
    events: Arc<Mutex<Vec<Value>>>,
    negotiation: Arc<Negotiation>,
) {
    let send = |v: Value| {
        let _ = tx.send(Message::Text(v.to_string().into()));
    };
    while let Some(v) = rx.recv().await {
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        let result: anyhow::Result<()> = async {
            match ty.as_str() {
                "answer" => {
                    let sdp = v["sdp"].as_str().context("sdp")?.to_owned();
                    pc.set_remote_description(RTCSessionDescription::answer(sdp)?)
                        .await?;
                }
                "offer" => {
                    if let Some(held) = negotiation.held_offer.lock().unwrap().take() {
                        send(json!({"type": "offer", "sdp": held}));
                    }
                    let glare = pc
                        .pending_local_description()
                        .await
                        .is_some_and(|d| d.sdp_type == RTCSdpType::Offer);
                    if glare {
                        // Polite peer: ours yields, and is made again below.
                        pc.set_local_description(RTCSessionDescription::rollback(None)?)
                            .await?;
                        negotiation.rollbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    let sdp = v["sdp"].as_str().context("sdp")?.to_owned();
                    pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
                        .await?;
                    let answer = pc.create_answer(None).await?;
                    pc.set_local_description(answer).await?;
                    let sdp = pc.local_description().await.context("answer")?.sdp;
                    send(json!({"type": "answer", "sdp": sdp}));
                    if glare {
                        let offer = pc.create_offer(None).await?;
                        pc.set_local_description(offer).await?;
                        let sdp = pc.local_description().await.context("offer")?.sdp;
                        send(json!({"type": "offer", "sdp": sdp}));
                    }
                }
                "downlink_offer" => {
                    let pc = downlink.as_ref().context("no downlink")?;
                    let sdp = v["sdp"].as_str().context("sdp")?.to_owned();
                    pc.set_remote_description(RTCSessionDescription::offer(sdp)?)
                        .await?;
                    let answer = pc.create_answer(None).await?;
                    pc.set_local_description(answer).await?;
                    let sdp = pc.local_description().await.context("answer")?.sdp;
                    send(json!({"type": "downlink_answer", "sdp": sdp}));
                }
                "candidate" => {
                    let c: RTCIceCandidateInit = serde_json::from_value(v["candidate"].clone())?;
                    pc.add_ice_candidate(c).await?;
                }
                _ => {}
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("client could not handle {ty}: {e}");
        }
        events.lock().unwrap().push(v);
    }
}

/// Sends synthetic RTP until the connection closes: Opus-sized audio at 50
/// packets/s and 1000-byte video packets at 30 frames/s.
async fn send_media(
    index: u8,
    kind: Kind,
    local: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    ssrc: u32,
    connected: Arc<Mutex<bool>>,
    media: Media,
) {
    if let Media::Real(real) = media {
        let frames = real.vp8.clone();
        return send_real_media(kind, local, sender, ssrc, connected, real, frames, None).await;
    }
    let (interval, ts_step) = match kind {
        Kind::Audio => (Duration::from_millis(20), 960),
        Kind::Video => (Duration::from_millis(33), 3000),
    };
    let level = match (&media, kind) {
        (Media::Speaking(level), Kind::Audio) => Some(level.clone()),
        _ => None,
    };
    let mut level_id = None;
    let mut tick = tokio::time::interval(interval);
    let mut counter: u32 = 0;
    let mut seq: u16 = rand::random();
    let mut ts: u32 = rand::random();
    let mut pt = None;
    let started = Instant::now();
    loop {
        tick.tick().await;
        if !*connected.lock().unwrap() {
            if counter > 0 || started.elapsed() > Duration::from_secs(60) {
                return;
            }
            continue;
        }
        if pt.is_none() {
            let Ok(params) = sender.get_parameters().await else {
                return;
            };
            pt = params.rtp_parameters.codecs.first().map(|c| c.payload_type);
            level_id = params
                .rtp_parameters
                .header_extensions
                .iter()
                .find(|e| e.uri == confer_sfu::forward::AUDIO_LEVEL_URI)
                .map(|e| e.id as u8);
        }
        let mut pkt = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker: kind == Kind::Video,
                payload_type: pt.unwrap_or(96),
                sequence_number: seq,
                timestamp: ts,
                ssrc,
                ..Default::default()
            },
            payload: payload(index, kind, counter),
        };
        if let (Some(level), Some(id)) = (&level, level_id) {
            let dbov = level.load(Ordering::Relaxed).min(127);
            let _ = pkt
                .header
                .set_extension(id, Bytes::copy_from_slice(&[dbov]));
        }
        if local.write_rtp(pkt).await.is_err() {
            // A track added later is not bound until its offer is answered.
            if counter == 0 && started.elapsed() < Duration::from_secs(60) {
                continue;
            }
            return;
        }
        counter += 1;
        seq = seq.wrapping_add(1);
        ts = ts.wrapping_add(ts_step);
    }
}

/// What a test client publishes.
#[derive(Clone)]
pub enum Media {
    /// Self-describing payloads that receivers check byte by byte.
    Synthetic,
    /// Synthetic, with the audio level (RFC 6464, dBov: 0 loudest, 127
    /// silent) that browsers send on every audio packet; changeable.
    Speaking(Arc<AtomicU8>),
    Real(Arc<RealMedia>),
}

/// Real codec data, for the recorder: an Opus tone and VP8 frames.
pub struct RealMedia {
    pub tone_hz: f64,
    /// VP8 frames at 30 fps, sent in a loop (H.264 access units with
    /// [`RealMedia::h264`]).
    pub vp8: Arc<Vec<Vec<u8>>>,
    /// The frames are H.264 (Annex B), not VP8.
    pub h264: bool,
    /// With these, the video is published as simulcast: these frames on
    /// layer `h`, `vp8` on layer `f`.
    pub small: Option<Arc<Vec<Vec<u8>>>>,
    /// Sound only in 100 ms beeps every 2 s, in step with video frames 0-2
    /// of every 60 (where [`vp8_flash_frames`] flashes).
    pub beeps: bool,
    /// When the client's audio and video senders start, shared so that
    /// their first packets leave together.
    start: std::sync::OnceLock<Instant>,
}

impl RealMedia {
    /// A continuous tone.
    pub fn tone(tone_hz: f64, vp8: Arc<Vec<Vec<u8>>>) -> Arc<RealMedia> {
        Arc::new(RealMedia {
            tone_hz,
            vp8,
            small: None,
            beeps: false,
            h264: false,
            start: Default::default(),
        })
    }

    /// A continuous tone, and H.264 video from [`h264_test_frames`].
    pub fn h264(tone_hz: f64, frames: Arc<Vec<Vec<u8>>>) -> Arc<RealMedia> {
        Arc::new(RealMedia {
            tone_hz,
            vp8: frames,
            small: None,
            beeps: false,
            h264: true,
            start: Default::default(),
        })
    }

    /// Beeps in step with flashes, for measuring A/V sync.
    pub fn beeps(tone_hz: f64, flashes: Arc<Vec<Vec<u8>>>) -> Arc<RealMedia> {
        Arc::new(RealMedia {
            tone_hz,
            vp8: flashes,
            small: None,
            beeps: true,
            h264: false,
            start: Default::default(),
        })
    }

    /// A tone, and video as two simulcast layers: `small` (rid `h`) and
    /// `big` (rid `f`).
    pub fn simulcast(
        tone_hz: f64,
        small: Arc<Vec<Vec<u8>>>,
        big: Arc<Vec<Vec<u8>>>,
    ) -> Arc<RealMedia> {
        Arc::new(RealMedia {
            tone_hz,
            vp8: big,
            small: Some(small),
            beeps: false,
            h264: false,
            start: Default::default(),
        })
    }
}

/// VP8 frames, black with a white flash in frames 0-2 of every 60 (100 ms
/// every 2 s at 30 fps), `seconds` long.
pub fn vp8_flash_frames(seconds: u32) -> anyhow::Result<Vec<Vec<u8>>> {
    vp8_frames(&format!(
        "color=c=black:size=320x240:rate=30:duration={seconds},\
         drawbox=x=0:y=0:w=iw:h=ih:color=white:t=fill:enable='lt(mod(n\\,60)\\,3)'"
    ))
}

/// VP8 frames of a test pattern, `seconds` long at 30 fps with a keyframe
/// every second, made by the ffmpeg command-line tool.
pub fn vp8_test_frames(seconds: u32) -> anyhow::Result<Vec<Vec<u8>>> {
    vp8_frames(&format!("testsrc=size=320x240:rate=30:duration={seconds}"))
}

/// The same test picture at 160×120 and about 70 kbit/s, for a smaller
/// simulcast layer (the 320×240 one is about 220 kbit/s).
pub fn vp8_small_test_frames(seconds: u32) -> anyhow::Result<Vec<Vec<u8>>> {
    vp8_frames_at(
        &format!("testsrc=size=160x120:rate=30:duration={seconds}"),
        "60k",
    )
}

/// H.264 access units (Annex B, constrained baseline as browsers send) of
/// a test pattern, `seconds` long at 30 fps with an IDR every second.
pub fn h264_test_frames(seconds: u32) -> anyhow::Result<Vec<Vec<u8>>> {
    let path = std::env::temp_dir().join(format!("confer-{:016x}.h264", rand::random::<u64>()));
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc=size=320x240:rate=30:duration={seconds}"))
        .args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-profile:v",
            "baseline",
        ])
        .args([
            "-g",
            "30",
            "-bsf:v",
            "h264_metadata=aud=insert",
            "-f",
            "h264",
        ])
        .arg(&path)
        .status()?;
    anyhow::ensure!(status.success(), "ffmpeg could not make H.264 test frames");
    let data = std::fs::read(&path)?;
    let _ = std::fs::remove_file(&path);
    // Access unit delimiters (NAL type 9) mark where each frame starts;
    // browsers send none, so they are cut out.
    let nals = nal_units(&data);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for nal in nals {
        if nal[0] & 0x1f == 9 {
            frames.push(Vec::new());
        } else if let Some(f) = frames.last_mut() {
            f.extend_from_slice(&[0, 0, 0, 1]);
            f.extend_from_slice(nal);
        }
    }
    frames.retain(|f| !f.is_empty());
    Ok(frames)
}

/// The NAL units of an Annex B stream, without start codes.
fn nal_units(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i..i + 3] == [0, 0, 1] {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &a)| {
            let mut b = starts.get(k + 1).map_or(data.len(), |&n| n - 3);
            // A four-byte start code leaves its leading zero behind.
            while b > a && data[b - 1] == 0 {
                b -= 1;
            }
            &data[a..b]
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// RTP payloads of one access unit (RFC 6184): small NAL units whole,
/// larger ones in FU-A fragments; the marker on the last.
fn h264_packets(access_unit: &[u8]) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    for nal in nal_units(access_unit) {
        if nal.len() <= 1000 {
            out.push((nal.to_vec(), false));
            continue;
        }
        let chunks: Vec<&[u8]> = nal[1..].chunks(1000).collect();
        let last = chunks.len() - 1;
        for (i, c) in chunks.into_iter().enumerate() {
            let mut fu = nal[0] & 0x1f;
            if i == 0 {
                fu |= 0x80;
            }
            if i == last {
                fu |= 0x40;
            }
            let mut p = vec![(nal[0] & 0xe0) | 28, fu];
            p.extend_from_slice(c);
            out.push((p, false));
        }
    }
    if let Some(last) = out.last_mut() {
        last.1 = true;
    }
    out
}

/// Width of the VP8 keyframe starting in `payload` (an RTP payload with a
/// one-byte descriptor, as the test clients send), if it starts one.
pub fn vp8_keyframe_width(payload: &[u8]) -> Option<u16> {
    let frame = payload.get(1..)?;
    let keyframe = payload.first()? & 0x10 != 0 && frame.first()? & 0x01 == 0;
    (keyframe && frame.get(3..6)? == [0x9d, 0x01, 0x2a])
        .then(|| u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff)
}

fn vp8_frames(lavfi: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    vp8_frames_at(lavfi, "300k")
}

fn vp8_frames_at(lavfi: &str, bitrate: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let path = std::env::temp_dir().join(format!("confer-vp8-{:016x}.ivf", rand::random::<u64>()));
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(lavfi)
        .args([
            "-c:v",
            "libvpx",
            "-g",
            "30",
            "-b:v",
            bitrate,
            "-deadline",
            "realtime",
            "-f",
            "ivf",
        ])
        .arg(&path)
        .status()?;
    anyhow::ensure!(status.success(), "ffmpeg could not make VP8 test frames");
    let data = std::fs::read(&path)?;
    let _ = std::fs::remove_file(&path);
    // IVF: a 32-byte file header, then per frame a 12-byte header (size, pts) and the frame.
    let mut frames = Vec::new();
    let mut at = 32;
    while at + 12 <= data.len() {
        let size = u32::from_le_bytes(data[at..at + 4].try_into()?) as usize;
        at += 12;
        anyhow::ensure!(at + size <= data.len(), "truncated IVF");
        frames.push(data[at..at + size].to_vec());
        at += size;
    }
    Ok(frames)
}

async fn send_layer(layer: Layer, connected: Arc<Mutex<bool>>, real: Arc<RealMedia>) {
    let tag = Some((layer.rid, layer.transceiver));
    let (local, sender) = (layer.local, layer.sender);
    send_real_media(
        Kind::Video,
        local,
        sender,
        layer.ssrc,
        connected,
        real,
        layer.frames,
        tag,
    )
    .await
}

/// Sends `real`'s media: for video, `frames`; a simulcast layer's packets
/// are tagged with their transceiver's mid and their rid, as browsers do.
#[allow(clippy::too_many_arguments)]
async fn send_real_media(
    kind: Kind,
    local: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    ssrc: u32,
    connected: Arc<Mutex<bool>>,
    real: Arc<RealMedia>,
    frames: Arc<Vec<Vec<u8>>>,
    layer: Option<(
        &'static str,
        Arc<dyn webrtc::rtp_transceiver::RtpTransceiver>,
    )>,
) {
    let interval = match kind {
        Kind::Audio => Duration::from_millis(20),
        Kind::Video => Duration::from_micros(33_333),
    };
    let waited = Instant::now();
    while !*connected.lock().unwrap() {
        if waited.elapsed() > Duration::from_secs(60) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Ok(params) = sender.get_parameters().await else {
        return;
    };
    let pt = params.rtp_parameters.codecs.first().map(|c| c.payload_type);
    let ext_id = |uri: &str| {
        params
            .rtp_parameters
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)
            .map(|e| e.id as u8)
    };
    let mut tags: Vec<(u8, Bytes)> = Vec::new();
    if let Some((rid, transceiver)) = &layer {
        let mid = transceiver.mid().await.ok().flatten().unwrap_or_default();
        let uris = [
            ("urn:ietf:params:rtp-hdrext:sdes:mid", mid.into_bytes()),
            (
                "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
                rid.as_bytes().to_vec(),
            ),
        ];
        for (uri, value) in uris {
            if let Some(id) = ext_id(uri) {
                tags.push((id, Bytes::from(value)));
            }
        }
    }
    // Audio and video start on the same instant, so frame n of the video
    // and the audio at n × 33.3 ms were meant to be heard and seen together.
    let start = *real
        .start
        .get_or_init(|| Instant::now() + Duration::from_millis(300));
    let mut tick = tokio::time::interval_at(start.into(), interval);
    let mut seq: u16 = rand::random();
    let mut ts: u32 = rand::random();
    let mut n: u64 = 0;
    let mut encoder = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Audio)
        .expect("opus encoder");
    let mut out = vec![0u8; 1500];
    loop {
        tick.tick().await;
        if !*connected.lock().unwrap() {
            return;
        }
        // (payload, marker) packets of this tick.
        let packets: Vec<(Vec<u8>, bool)> = match kind {
            Kind::Audio => {
                let pcm: Vec<i16> = (0..960)
                    .map(|i| {
                        let t = (n * 960 + i) as f64 / 48_000.0;
                        if real.beeps && t % 2.0 >= 0.1 {
                            return 0;
                        }
                        (6000.0 * (2.0 * std::f64::consts::PI * real.tone_hz * t).sin()) as i16
                    })
                    .collect();
                let len = encoder.encode(&pcm, &mut out).expect("opus encodes");
                vec![(out[..len].to_vec(), false)]
            }
            Kind::Video if real.h264 => h264_packets(&frames[(n as usize) % frames.len()]),
            Kind::Video => {
                let frame = &frames[(n as usize) % frames.len()];
                let chunks: Vec<&[u8]> = frame.chunks(1000).collect();
                let last = chunks.len() - 1;
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        // RFC 7741 descriptor: S=1 on the first packet of the frame.
                        let mut p = vec![if i == 0 { 0x10 } else { 0x00 }];
                        p.extend_from_slice(c);
                        (p, i == last)
                    })
                    .collect()
            }
        };
        for (payload, marker) in packets {
            let mut pkt = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    marker,
                    payload_type: pt.unwrap_or(96),
                    sequence_number: seq,
                    timestamp: ts,
                    ssrc,
                    ..Default::default()
                },
                payload: Bytes::from(payload),
            };
            for (id, value) in &tags {
                let _ = pkt.header.set_extension(*id, value.clone());
            }
            if local.write_rtp(pkt).await.is_err() {
                return;
            }
            seq = seq.wrapping_add(1);
        }
        n += 1;
        ts = ts.wrapping_add(match kind {
            Kind::Audio => 960,
            Kind::Video => 3000,
        });
    }
}

/// Checks a received stream: every payload intact and from `publisher_index`,
/// and after ordering by sequence number the counters rise one by one
/// (allowing `max_gaps` missing packets, none on a healthy loopback).
pub fn verify_stream(
    r: &Received,
    publisher_index: u8,
    kind: Kind,
    max_gaps: usize,
) -> anyhow::Result<usize> {
    if r.packets.is_empty() {
        bail!("no packets");
    }
    // Unwrap sequence numbers relative to the first packet.
    let base = r.packets[0].0;
    let mut seq_sorted: Vec<(i64, u32)> = Vec::with_capacity(r.packets.len());
    for (seq, payload) in &r.packets {
        let Some((idx, k, counter)) = check_payload(payload) else {
            bail!("payload of seq {seq} is corrupt");
        };
        if idx != publisher_index || k != kind {
            bail!(
                "payload from sender {idx} {k:?} on the stream of sender {publisher_index} {kind:?}"
            );
        }
        let delta = seq.wrapping_sub(base) as i16 as i64;
        seq_sorted.push((delta, counter));
    }
    seq_sorted.sort();
    seq_sorted.dedup();
    let mut gaps = 0;
    for w in seq_sorted.windows(2) {
        if w[1].1 <= w[0].1 {
            bail!("counter {} follows {} in sequence order", w[1].1, w[0].1);
        }
        if w[1].1 - w[0].1 != (w[1].0 - w[0].0) as u32 {
            bail!("sequence numbers and counters disagree");
        }
        gaps += (w[1].1 - w[0].1 - 1) as usize;
    }
    if gaps > max_gaps {
        bail!("{gaps} packets missing");
    }
    Ok(seq_sorted.len())
}
