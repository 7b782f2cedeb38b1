//! A recorder taking part in a room over WebRTC, as `confer recorder` does
//! on another machine: it joins through signaling (`docs/signaling.md`) as
//! a hidden participant, with a token Confer minted for it, receives every
//! track, and turns what arrives into the same [`Tapped`] events as the
//! in-process tap, so that one pipeline records both ways.
//!
//! Sync differs in one respect: the sender reports a recorder receives are
//! the SFU's, which map each forwarded stream to the SFU's clock at sending
//! time rather than to the publisher's capture clock. A publisher's audio
//! and video are still lined up, to within how differently the two were
//! delayed on their way to the SFU.

use crate::recording::Feed;
use confer_sfu::TrackKind;
use confer_sfu::keyframe::KeyframeRequestTap;
use confer_sfu::tap::{TAP_CAPACITY, TapTrack, Tapped};
use futures_util::{SinkExt, StreamExt};
use rtc::interceptor::Slot;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCPeerConnectionIceEvent, RTCSessionDescription,
    Registry, SettingEngineBuilder, register_default_interceptors,
};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot reach signaling at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("signaling refused the recorder: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("signaling closed the connection before admitting the recorder")]
    Closed,
    #[error("no answer to join within {0:?}")]
    Timeout(Duration),
    #[error("WebRTC: {0}")]
    Webrtc(String),
}

fn webrtc_error(e: impl std::fmt::Display) -> JoinError {
    JoinError::Webrtc(e.to_string())
}

const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Who publishes under a stream id (a participant id), from `joined` and
/// `participant_joined`.
#[derive(Clone)]
struct Person {
    user_id: String,
    name: String,
}

type Receiving = (Arc<dyn TrackRemote>, u32);

/// What the peer connection's tracks and the signaling messages share.
struct Shared {
    room: String,
    events: mpsc::Sender<Tapped>,
    people: Mutex<HashMap<String, Person>>,
    /// Track id → the track and its SSRC, for keyframe requests.
    tracks: Mutex<HashMap<String, Receiving>>,
}

impl Shared {
    fn tell(&self, e: Tapped) {
        // As the in-process tap: a recorder that falls behind loses
        // packets (gaps it sees), it never holds up the connection.
        if self.events.try_send(e).is_err() {
            debug!(room = %self.room, "recorder behind; packet dropped");
        }
    }

    fn request_keyframe(&self, track_id: &str) {
        let Some((track, ssrc)) = self.tracks.lock().unwrap().get(track_id).cloned() else {
            return;
        };
        tokio::spawn(async move {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc: ssrc,
            };
            let _ = track.write_rtcp(vec![Box::new(pli)]).await;
        });
    }

    /// Relays a signaling message that concerns the recording.
    fn on_room_event(&self, v: &Value) {
        let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        match v["type"].as_str() {
            Some("participant_joined") => self.add_person(&v["participant"]),
            Some("track_removed") => self.tell(Tapped::TrackEnded {
                track_id: text("track_id").into(),
            }),
            Some("active_speaker") => self.tell(Tapped::Speaker {
                participant_id: v["participant_id"].as_str().map(str::to_owned),
            }),
            _ => {}
        }
    }

    fn add_person(&self, p: &Value) {
        let (Some(id), Some(user_id), Some(name)) =
            (p["id"].as_str(), p["user_id"].as_str(), p["name"].as_str())
        else {
            return;
        };
        self.people.lock().unwrap().insert(
            id.to_owned(),
            Person {
                user_id: user_id.to_owned(),
                name: name.to_owned(),
            },
        );
    }

    /// Reads one forwarded track until it ends.
    async fn receive(self: Arc<Self>, track: Arc<dyn TrackRemote>) {
        let participant_id = track.stream_id().await.to_string();
        let track_id: Arc<str> = track.track_id().await.to_string().into();
        let kind = match track.kind().await {
            RtpCodecKind::Audio => TrackKind::Audio,
            _ => TrackKind::Video,
        };
        let mut announced = false;
        while let Some(evt) = track.poll().await {
            match evt {
                TrackRemoteEvent::OnRtpPacket(packet) => {
                    let at = Instant::now();
                    if !announced {
                        announced = true;
                        let ssrc = packet.header.ssrc;
                        let codec = track.codec(ssrc).await.unwrap_or_default();
                        let person = self.people.lock().unwrap().get(&participant_id).cloned();
                        let person = person.unwrap_or_else(|| Person {
                            user_id: participant_id.clone(),
                            name: participant_id.clone(),
                        });
                        self.tracks
                            .lock()
                            .unwrap()
                            .insert(track_id.to_string(), (track.clone(), ssrc));
                        self.tell(Tapped::Track(TapTrack {
                            track_id: track_id.clone(),
                            participant_id: participant_id.clone(),
                            user_id: person.user_id,
                            name: person.name,
                            kind,
                            codec: codec.mime_type.to_ascii_lowercase(),
                            clock_rate: codec.clock_rate,
                        }));
                    }
                    self.tell(Tapped::Rtp {
                        track_id: track_id.clone(),
                        at,
                        packet,
                    });
                }
                TrackRemoteEvent::OnRtcpPacket(packets) => {
                    for p in &packets {
                        if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                            self.tell(Tapped::SenderReport {
                                track_id: track_id.clone(),
                                ntp: sr.ntp_time,
                                rtp: sr.rtp_time,
                            });
                        }
                    }
                }
                TrackRemoteEvent::OnEnded => break,
                _ => {}
            }
        }
        self.tracks.lock().unwrap().remove(&*track_id);
        self.tell(Tapped::TrackEnded { track_id });
    }
}

struct Handler {
    /// Weak: the feed must end once the tracks and signaling are gone.
    shared: std::sync::Weak<Shared>,
    candidates: mpsc::UnboundedSender<RTCIceCandidateInit>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(c) = event.candidate.to_json() {
            let _ = self.candidates.send(c);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(shared) = self.shared.upgrade() {
            tokio::spawn(shared.receive(track));
        }
    }
}

/// A recvonly peer connection that hands senders' reports to the
/// application, as the SFU's own does.
async fn peer_connection(
    handler: Handler,
    bind: std::net::IpAddr,
) -> Result<Arc<dyn PeerConnection>, JoinError> {
    let mut me = MediaEngine::default();
    me.register_default_codecs().map_err(webrtc_error)?;
    let registry = register_default_interceptors(Registry::new(), &mut me).map_err(webrtc_error)?;
    let registry = registry.with(Slot::from(14_000), KeyframeRequestTap::default());
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_interceptor_registry(registry)
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_include_loopback_candidate(bind.is_loopback())
                .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                // The SFU's first check often overtakes its trickled
                // candidate; webrtc-rs would wait 1 s before nominating the
                // peer-reflexive pair that check makes, delaying the start.
                .with_prflx_acceptance_min_wait(Some(std::time::Duration::ZERO))
                .build(),
        )
        .with_handler(Arc::new(handler))
        .with_udp_addrs(vec![std::net::SocketAddr::new(bind, 0).to_string()])
        .build()
        .await
        .map_err(webrtc_error)?;
    let pc: Arc<dyn PeerConnection> = Arc::new(pc);
    // Nothing to send: one recvonly m-line for the first offer.
    pc.add_transceiver_from_kind(
        RtpCodecKind::Audio,
        Some(RTCRtpTransceiverInit {
            direction: RTCRtpTransceiverDirection::Recvonly,
            streams: vec![],
            send_encodings: vec![],
        }),
    )
    .await
    .map_err(webrtc_error)?;
    Ok(pc)
}

/// Joins `room` through signaling at `base` (`http://host:port`) with a
/// recorder token, and returns the room's media as a [`Feed`]. `bind` is
/// the address its UDP socket takes (where the SFU can reach it). The feed
/// ends when the room closes or the connection is lost; ending it leaves.
pub async fn join(
    base: &str,
    room: &str,
    token: &str,
    bind: std::net::IpAddr,
) -> Result<Feed, JoinError> {
    let url = format!(
        "{}/ws",
        base.trim_end_matches('/').replacen("http", "ws", 1)
    );
    let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| JoinError::Connect {
            url: url.clone(),
            message: e.to_string(),
        })?;
    let (mut sink, mut stream) = socket.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        while let Some(v) = out_rx.recv().await {
            let leaving = v["type"] == "leave";
            if sink
                .send(Message::Text(v.to_string().into()))
                .await
                .is_err()
                || leaving
            {
                let _ = sink.send(Message::Close(None)).await;
                return;
            }
        }
    });
    let _ = out.send(json!({"type": "join", "token": token, "room": room}));
    let joined = tokio::time::timeout(JOIN_TIMEOUT, async {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(text) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            match v["type"].as_str() {
                Some("joined") => return Ok(v),
                Some("error") => {
                    return Err(JoinError::Refused {
                        code: v["code"].as_str().unwrap_or_default().to_owned(),
                        message: v["message"].as_str().unwrap_or_default().to_owned(),
                    });
                }
                _ => {}
            }
        }
        Err(JoinError::Closed)
    })
    .await
    .map_err(|_| JoinError::Timeout(JOIN_TIMEOUT))??;

    let (events, events_rx) = mpsc::channel(TAP_CAPACITY);
    let shared = Arc::new(Shared {
        room: room.to_owned(),
        events,
        people: Mutex::default(),
        tracks: Mutex::default(),
    });
    for p in joined["participants"].as_array().into_iter().flatten() {
        shared.add_person(p);
    }
    let (candidates, mut candidates_rx) = mpsc::unbounded_channel();
    let handler = Handler {
        shared: Arc::downgrade(&shared),
        candidates,
    };
    let pc = peer_connection(handler, bind).await?;
    let ice_out = out.clone();
    tokio::spawn(async move {
        while let Some(c) = candidates_rx.recv().await {
            if ice_out
                .send(json!({"type": "candidate", "candidate": c}))
                .is_err()
            {
                return;
            }
        }
    });
    let offer = pc.create_offer(None).await.map_err(webrtc_error)?;
    pc.set_local_description(offer)
        .await
        .map_err(webrtc_error)?;
    let sdp = pc
        .local_description()
        .await
        .ok_or_else(|| webrtc_error("no local description"))?
        .sdp;
    let _ = out.send(json!({"type": "offer", "sdp": sdp}));

    // Signaling: answers, offers, candidates, room events. The feed's
    // senders live in `shared` and the tracks' tasks; closing the peer
    // connection when the room is gone ends them, and so the feed.
    let (task_pc, task_shared, answers) = (pc.clone(), shared.clone(), out.clone());
    let room_id = room.to_owned();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(text) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            if v["type"] == "removed" {
                info!(room = %room_id, reason = %v["reason"], "recorder removed from the room");
                break;
            }
            if let Err(e) = negotiate(&task_pc, &answers, &v).await {
                warn!(room = %room_id, "recorder signaling ({}): {e}", v["type"]);
            }
            task_shared.on_room_event(&v);
        }
        let _ = task_pc.close().await;
    });

    let keyframes = Arc::downgrade(&shared);
    let (end_pc, end_out) = (pc, out);
    drop(shared);
    Ok(Feed {
        room: room.to_owned(),
        events: events_rx,
        keyframe: Box::new(move |id| {
            if let Some(s) = keyframes.upgrade() {
                s.request_keyframe(id);
            }
        }),
        end: Box::new(move || {
            let _ = end_out.send(json!({"type": "leave"}));
            tokio::spawn(async move {
                let _ = end_pc.close().await;
            });
        }),
    })
}

async fn negotiate(
    pc: &Arc<dyn PeerConnection>,
    out: &mpsc::UnboundedSender<Value>,
    v: &Value,
) -> Result<(), JoinError> {
    let sdp = || v["sdp"].as_str().unwrap_or_default().to_owned();
    match v["type"].as_str() {
        Some("answer") => {
            let d = RTCSessionDescription::answer(sdp()).map_err(webrtc_error)?;
            pc.set_remote_description(d).await.map_err(webrtc_error)?;
        }
        Some("offer") => {
            let d = RTCSessionDescription::offer(sdp()).map_err(webrtc_error)?;
            pc.set_remote_description(d).await.map_err(webrtc_error)?;
            let answer = pc.create_answer(None).await.map_err(webrtc_error)?;
            pc.set_local_description(answer)
                .await
                .map_err(webrtc_error)?;
            let local = pc
                .local_description()
                .await
                .ok_or_else(|| webrtc_error("no local description"))?;
            let _ = out.send(json!({"type": "answer", "sdp": local.sdp}));
        }
        Some("candidate") => {
            let c: RTCIceCandidateInit =
                serde_json::from_value(v["candidate"].clone()).map_err(webrtc_error)?;
            pc.add_ice_candidate(c).await.map_err(webrtc_error)?;
        }
        _ => {}
    }
    Ok(())
}
