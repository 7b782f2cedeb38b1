//! The WebRTC side of a simulated participant, whatever server it talks to:
//! a peer connection on loopback that publishes generated media and feeds
//! everything it receives into its [`Subscriber`] measurements.

use crate::media::{self, Kind, Marker, Pacer, TrackSource, VideoShape};
use crate::stats::{Counters, Sent, Subscriber};
use anyhow::Context;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp::extension::HeaderExtension;
use rtc::rtp::extension::audio_level_extension::AudioLevelExtension;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};
use webrtc::rtp_transceiver::{
    RTCRtpTransceiverDirection, RTCRtpTransceiverInit, RtpSender, RtpTransceiver,
};

const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// What a participant publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    Nothing,
    Audio,
    AudioVideo,
}

/// Shared by every participant of a run.
pub struct Shared {
    pub counters: Counters,
    pub video: VideoShape,
    /// Video goes out as [`media::LAYERS`] simulcast layers.
    pub simulcast: bool,
    /// Video is paced as a browser paces it.
    pub pacing: bool,
    /// Confer's participants receive on a downlink of their own.
    pub downlink: bool,
    /// Set when publishers should stop.
    pub stop: watch::Receiver<bool>,
    /// Local address peers bind (127.0.0.1, or an address in a test namespace).
    pub bind_ip: std::net::IpAddr,
}

impl Shared {
    /// The pacer of one published track. Each simulcast layer is paced at
    /// the whole video's rate, as a browser's one pacer sends them all.
    pub fn pacer(&self, kind: Kind) -> Pacer {
        if !self.pacing || kind == Kind::Audio {
            return Pacer::unpaced();
        }
        let share: f64 = if self.simulcast {
            media::LAYERS.iter().map(|(_, share)| share).sum()
        } else {
            1.0
        };
        Pacer::new((self.video.bitrate_bps as f64 * share) as u64)
    }
}

pub struct Peer {
    pub pc: Arc<dyn PeerConnection>,
    /// The connection it receives on, when that is a downlink of its own.
    pub downlink: Option<Arc<dyn PeerConnection>>,
    pub stats: Arc<Mutex<Subscriber>>,
    pub sent: Arc<Sent>,
    connected: Arc<AtomicBool>,
    locals: Mutex<Vec<Track>>,
}

struct Handler {
    /// None on a downlink: its ICE-lite server only answers checks.
    candidates: Option<mpsc::UnboundedSender<RTCIceCandidateInit>>,
    connected: Arc<AtomicBool>,
    stats: Arc<Mutex<Subscriber>>,
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let (Some(candidates), Ok(c)) = (&self.candidates, event.candidate.to_json()) {
            let _ = candidates.send(c);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.connected.store(
            state == RTCPeerConnectionState::Connected,
            Ordering::Relaxed,
        );
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let stats = self.stats.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Some(evt) = track.poll().await {
                match evt {
                    TrackRemoteEvent::OnRtpPacket(p) => {
                        let now = media::clock();
                        shared.counters.add_received(p.payload.len());
                        if let Some(m) = Marker::read(&p.payload) {
                            stats.lock().unwrap().on_packet(m, now);
                        }
                    }
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
    }
}

impl Peer {
    /// A peer connection bound to loopback, with tracks for what it will
    /// publish. Its ICE candidates arrive on `candidates`.
    pub async fn new(
        publish: Publish,
        name: &str,
        started_us: u64,
        shared: Arc<Shared>,
        candidates: mpsc::UnboundedSender<RTCIceCandidateInit>,
    ) -> anyhow::Result<Peer> {
        let stats = Arc::new(Mutex::new(Subscriber::new(started_us)));
        let simulcast = shared.simulcast;
        let connected = Arc::new(AtomicBool::new(false));
        let downlink = match shared.downlink {
            true => {
                let handler = Handler {
                    candidates: None,
                    connected: Arc::new(AtomicBool::new(false)),
                    stats: stats.clone(),
                    shared: shared.clone(),
                };
                Some(build_pc(&shared, handler, true).await?)
            }
            false => None,
        };
        let handler = Handler {
            candidates: Some(candidates),
            connected: connected.clone(),
            stats: stats.clone(),
            shared: shared.clone(),
        };
        let pc = build_pc(&shared, handler, false).await?;
        let kinds: &[Kind] = match publish {
            Publish::Nothing => &[],
            Publish::Audio => &[Kind::Audio],
            Publish::AudioVideo => &[Kind::Audio, Kind::Video],
        };
        let mut locals = Vec::new();
        for &kind in kinds {
            if kind == Kind::Video && simulcast {
                locals.extend(add_simulcast_video(&pc, name).await?);
                continue;
            }
            let ssrc: u32 = rand::random();
            let (codec_kind, codec) = match kind {
                Kind::Audio => (
                    RtpCodecKind::Audio,
                    RTCRtpCodec {
                        mime_type: "audio/opus".into(),
                        clock_rate: 48000,
                        channels: 2,
                        ..Default::default()
                    },
                ),
                Kind::Video => (
                    RtpCodecKind::Video,
                    RTCRtpCodec {
                        mime_type: "video/VP8".into(),
                        clock_rate: 90000,
                        ..Default::default()
                    },
                ),
            };
            let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
                format!("{name}-stream"),
                format!("{name}-{kind:?}").to_lowercase(),
                format!("{name} {kind:?}"),
                codec_kind,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec,
                    ..Default::default()
                }],
            )));
            let sender = pc.add_track(local.clone() as Arc<dyn TrackLocal>).await?;
            locals.push(Track {
                kind,
                local,
                sender,
                ssrc,
                layer: None,
            });
        }
        Ok(Peer {
            pc,
            downlink,
            stats,
            sent: Arc::default(),
            connected,
            locals: Mutex::new(locals),
        })
    }

    /// Starts sending generated media as publisher `index` once connected;
    /// `speaking` or muted (audio at level 127, as a browser sends it).
    pub fn start_publishing(&self, index: u32, speaking: bool, shared: Arc<Shared>) {
        for track in self.locals.lock().unwrap().drain(..) {
            tokio::spawn(publish(
                track,
                (index, speaking),
                self.connected.clone(),
                self.sent.clone(),
                shared.clone(),
            ));
        }
    }

    /// One recvonly audio m-line, for a client with nothing to send that
    /// makes the offer (an offer needs at least one m-line).
    pub async fn add_recvonly_audio(&self) -> anyhow::Result<()> {
        self.pc
            .add_transceiver_from_kind(
                RtpCodecKind::Audio,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    streams: vec![],
                    send_encodings: vec![],
                }),
            )
            .await?;
        Ok(())
    }

    /// Answers the server's offer of the downlink.
    pub async fn answer_downlink(&self, offer_sdp: String) -> anyhow::Result<String> {
        let pc = self.downlink.as_ref().context("no downlink")?;
        pc.set_remote_description(RTCSessionDescription::offer(offer_sdp)?)
            .await?;
        let answer = pc.create_answer(None).await?;
        pc.set_local_description(answer).await?;
        Ok(pc.local_description().await.context("answer")?.sdp)
    }

    /// Answers a remote offer.
    pub async fn answer(&self, offer_sdp: String) -> anyhow::Result<String> {
        self.pc
            .set_remote_description(RTCSessionDescription::offer(offer_sdp)?)
            .await?;
        let answer = self.pc.create_answer(None).await?;
        self.pc.set_local_description(answer).await?;
        Ok(self.pc.local_description().await.context("answer")?.sdp)
    }

    pub async fn accept_answer(&self, answer_sdp: String) -> anyhow::Result<()> {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(answer_sdp)?)
            .await?;
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub async fn create_offer(&self) -> anyhow::Result<String> {
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer).await?;
        Ok(self.pc.local_description().await.context("offer")?.sdp)
    }
}

/// A peer connection bound to the run's address. `downlink` answers as
/// browsers do, as the DTLS client (webrtc-rs would be the server for an
/// ICE-lite offer).
async fn build_pc(
    shared: &Shared,
    handler: Handler,
    downlink: bool,
) -> anyhow::Result<Arc<dyn PeerConnection>> {
    let bind = std::net::SocketAddr::new(shared.bind_ip, 0).to_string();
    let mut me = MediaEngine::default();
    me.register_default_codecs()?;
    // Audio levels, as browsers send them: a muted microphone sends level 127.
    me.register_header_extension(
        rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability {
            uri: AUDIO_LEVEL_URI.to_owned(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    let registry = register_default_interceptors(Registry::new(), &mut me)?;
    let mut settings = SettingEngineBuilder::new()
        .with_include_loopback_candidate(true)
        // No mDNS socket: nothing here needs one, and a test namespace has
        // no multicast route to open it on.
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        // The server's first connectivity check often arrives before its
        // trickled candidate, so the client first knows the server as a
        // peer-reflexive candidate, which webrtc-rs will not nominate for
        // 1 s: one join in ten took 1.2 s instead of 0.2. Browsers do not
        // wait.
        .with_prflx_acceptance_min_wait(Some(std::time::Duration::ZERO));
    if downlink {
        settings =
            settings.with_answering_dtls_role(rtc::peer_connection::transport::RTCDtlsRole::Client);
    }
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_interceptor_registry(registry)
        .with_setting_engine(settings.build())
        .with_handler(Arc::new(handler))
        .with_udp_addrs(vec![bind])
        .build()
        .await?;
    Ok(Arc::new(pc))
}

struct Track {
    kind: Kind,
    local: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    ssrc: u32,
    /// A simulcast layer's index, and the transceiver whose mid it carries.
    layer: Option<(u8, Arc<dyn RtpTransceiver>)>,
}

/// A VP8 track sent as [`media::LAYERS`]: one transceiver, one stream per
/// layer.
async fn add_simulcast_video(
    pc: &Arc<dyn PeerConnection>,
    name: &str,
) -> anyhow::Result<Vec<Track>> {
    let ssrcs: Vec<u32> = media::LAYERS.iter().map(|_| rand::random()).collect();
    let encodings = media::LAYERS
        .iter()
        .zip(&ssrcs)
        .map(|((rid, _), &ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: (*rid).to_owned(),
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: RTCRtpCodec {
                mime_type: "video/VP8".into(),
                clock_rate: 90000,
                ..Default::default()
            },
            ..Default::default()
        })
        .collect();
    let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("{name}-stream"),
        format!("{name}-video"),
        format!("{name} Video"),
        RtpCodecKind::Video,
        encodings,
    )));
    let init = RTCRtpTransceiverInit {
        direction: RTCRtpTransceiverDirection::Sendonly,
        streams: vec![],
        send_encodings: vec![],
    };
    let transceiver = pc
        .add_transceiver_from_track(local.clone() as Arc<dyn TrackLocal>, Some(init))
        .await?;
    let sender = transceiver.sender().await?.context("no sender")?;
    Ok(ssrcs
        .into_iter()
        .enumerate()
        .map(|(layer, ssrc)| Track {
            kind: Kind::Video,
            local: local.clone(),
            sender: sender.clone(),
            ssrc,
            layer: Some((layer as u8, transceiver.clone())),
        })
        .collect())
}

/// The header extensions that tag a simulcast layer's packets with its
/// transceiver's mid and its rid, as browsers send them: (id, value).
async fn layer_tags(
    params: &rtc::rtp_transceiver::rtp_sender::RTCRtpSendParameters,
    layer: u8,
    transceiver: &Arc<dyn RtpTransceiver>,
) -> Vec<(u8, bytes::Bytes)> {
    let mid = transceiver.mid().await.ok().flatten().unwrap_or_default();
    let rid = media::LAYERS[layer as usize].0;
    [
        ("urn:ietf:params:rtp-hdrext:sdes:mid", mid.into_bytes()),
        (
            "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
            rid.as_bytes().to_vec(),
        ),
    ]
    .into_iter()
    .filter_map(|(uri, value)| {
        let ext = params
            .rtp_parameters
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)?;
        Some((ext.id as u8, bytes::Bytes::from(value)))
    })
    .collect()
}

async fn publish(
    t: Track,
    (index, speaking): (u32, bool),
    connected: Arc<AtomicBool>,
    sent: Arc<Sent>,
    shared: Arc<Shared>,
) {
    let mut stop = shared.stop.clone();
    while !connected.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
            _ = stop.changed() => return,
        }
    }
    let Ok(params) = t.sender.get_parameters().await else {
        return;
    };
    let pt = params
        .rtp_parameters
        .codecs
        .first()
        .map_or(96, |c| c.payload_type);
    let mut source = TrackSource::new(t.kind, (index, speaking), t.ssrc, pt);
    let mut video = shared.video;
    let mut tags = Vec::new();
    if let Some((layer, transceiver)) = &t.layer {
        source = source.in_layer(*layer);
        video.bitrate_bps = (video.bitrate_bps as f64 * media::LAYERS[*layer as usize].1) as u64;
        tags = layer_tags(&params, *layer, transceiver).await;
    }
    let mut pacer = shared.pacer(t.kind);
    let mut tick = tokio::time::interval(source.interval(&video));
    tick.set_missed_tick_behavior(pacer.missed_ticks());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        for out in source.next_packets(&video) {
            pacer.wait_for(out.bytes()).await;
            let (counter, mut pkt) = out.stamped();
            let written = if t.kind == Kind::Audio {
                let level = AudioLevelExtension {
                    level: source.audio_level(),
                    voice: source.is_speaking(),
                };
                t.local
                    .write_rtp_with_extensions(pkt, &[HeaderExtension::AudioLevel(level)])
                    .await
            } else {
                for (id, value) in &tags {
                    let _ = pkt.header.set_extension(*id, value.clone());
                }
                t.local.write_rtp(pkt).await
            };
            if written.is_err() {
                return;
            }
            sent.record(t.kind, counter);
            shared.counters.sent_packets.fetch_add(1, Ordering::Relaxed);
        }
    }
}
