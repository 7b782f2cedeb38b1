//! Rooms: who is in them, what they publish, and the events everyone is told.

use crate::bandwidth::{self, Demand};
use crate::config::SfuConfig;
use crate::error::SfuError;
use crate::mux::{MediaSocket, Mux};
use crate::peer::{self, Participant, PortPool};
use crate::simulcast;
use crate::tap::{TAP_CAPACITY, TapSender, TapTrack, Tapped};
use crate::track::{Published, Receiver, Reception, TrackInfo, TrackKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::RTCIceCandidateInit;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Moderator,
    Participant,
    /// A recorder taking part over WebRTC: it receives everything and
    /// publishes nothing, and the others are not shown it (they see the
    /// room's recording indicator instead). A room holding only recorders
    /// is empty.
    Recorder,
}

impl Role {
    pub fn is_hidden(self) -> bool {
        self == Role::Recorder
    }
}

/// Who is joining, as established by signaling (from the verified token).
#[derive(Clone, Debug)]
pub struct ParticipantInfo {
    pub user_id: String,
    pub name: String,
    pub role: Role,
    /// It receives on a downlink of its own ([`crate::downlink`]) rather
    /// than on its peer connection.
    pub downlink: bool,
}

/// A participant as others see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParticipantSummary {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub role: Role,
    pub audio_muted: bool,
    pub video_muted: bool,
    pub tracks: Vec<TrackInfo>,
}

/// A room as the admin API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomSummary {
    pub id: String,
    pub created_at: u64,
    pub participants: Vec<ParticipantStatus>,
}

/// A participant as the admin API shows it: who it is, and what reaches it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParticipantStatus {
    #[serde(flatten)]
    pub summary: ParticipantSummary,
    pub downlink: Downlink,
}

/// What the SFU sends a participant, so that an operator can tell why
/// someone's video looks small or has stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Downlink {
    /// Its estimated downlink in bit/s; `None` while no limit is known
    /// (no congestion feedback, or its queue was never seen to grow).
    pub estimate_bps: Option<u64>,
    pub receiving: Vec<Reception>,
}

/// Something everyone in a room is told.
#[derive(Clone, Debug)]
pub enum RoomEvent {
    ParticipantJoined(ParticipantSummary),
    ParticipantLeft {
        participant_id: String,
        reason: String,
    },
    TrackPublished {
        participant_id: String,
        track: TrackInfo,
    },
    TrackRemoved {
        participant_id: String,
        track_id: String,
    },
    Muted {
        participant_id: String,
        kind: TrackKind,
        muted: bool,
    },
    ActiveSpeaker {
        participant_id: Option<String>,
    },
    /// The room will be closed at `closes_at` (Unix seconds), e.g. because
    /// the meeting's scheduled time is over.
    Closing {
        closes_at: u64,
        reason: String,
    },
    Recording {
        state: RecordingState,
        recording_id: String,
        /// Why it stopped, when not by a moderator.
        reason: Option<String>,
    },
}

/// What became of a room's recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingState {
    Started,
    Stopped,
    /// Stored: listed and downloadable.
    Available,
    Failed,
}

/// Room lifecycle, for whoever keeps history (signaling's webhooks).
/// Sent in the order things happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Lifecycle {
    RoomOpened {
        room: String,
    },
    Joined {
        room: String,
        participant: ParticipantSummary,
    },
    Left {
        room: String,
        participant_id: String,
        user_id: String,
        reason: String,
    },
    RoomClosed {
        room: String,
        reason: String,
    },
}

/// Something one participant's signaling session must pass on.
#[derive(Debug)]
pub enum PeerEvent {
    /// A server-initiated renegotiation.
    Offer(String),
    /// The SFU's offer of the participant's downlink.
    DownlinkOffer(String),
    /// The answer to the client's offer.
    Answer(String),
    IceCandidate(RTCIceCandidateInit),
    Room(RoomEvent),
    /// The participant was removed (admin, room closed, connection lost).
    Removed {
        reason: String,
    },
    /// A moderator muted this participant.
    MutedByModerator {
        by: String,
        kind: TrackKind,
    },
    /// A video track does not fit in this participant's downlink and is not
    /// sent to it (`paused`), or is sent again.
    VideoPaused {
        track_id: String,
        paused: bool,
    },
}

/// The media plane: all rooms of this process.
pub struct Sfu {
    pub(crate) config: SfuConfig,
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    pub(crate) ports: PortPool,
    /// The one media socket, unless `udp_mux` is off.
    pub(crate) mux: Option<Mux>,
    observer: Mutex<Option<mpsc::UnboundedSender<Lifecycle>>>,
    /// The DTLS identity of every downlink, made with the first.
    certificate: std::sync::OnceLock<confer_transport::Certificate>,
}

/// What a successful join hands to signaling.
pub struct Joined {
    pub room: Arc<Room>,
    pub participant: Arc<Participant>,
    /// Events for this participant, in the order they must reach the client.
    pub events: mpsc::UnboundedReceiver<PeerEvent>,
    /// Everyone already in the room.
    pub others: Vec<ParticipantSummary>,
}

pub struct Room {
    pub id: String,
    sfu: Weak<Sfu>,
    created_at: SystemTime,
    inner: Mutex<RoomInner>,
    /// Where a recording taps the room's media, if one is running.
    tap: Mutex<Option<TapSender>>,
    /// The recording in progress, if any (its id), for joiners to be told.
    recording: Mutex<Option<String>>,
}

impl RoomInner {
    /// Participants the others see.
    fn visible(&self) -> impl Iterator<Item = &Arc<Participant>> {
        self.participants
            .iter()
            .filter(|p| !p.info.role.is_hidden())
    }
}

#[derive(Default)]
struct RoomInner {
    participants: Vec<Arc<Participant>>,
    tracks: Vec<Arc<Published>>,
    speaker: Option<String>,
    closed: bool,
    /// Bumped whenever the room becomes empty, so a stale grace timer
    /// cannot remove a room that filled up again.
    empty_epoch: u64,
}

impl Sfu {
    /// Binds the media port (`udp_mux`); must run inside tokio.
    pub fn new(config: SfuConfig) -> Result<Arc<Sfu>, SfuError> {
        let ports = PortPool::new(config.udp_port_min, config.udp_port_max);
        let mux = if config.udp_mux {
            let addr = SocketAddr::new(config.ice_ip, config.udp_port);
            let mux = Mux::bind(addr).map_err(|source| SfuError::Bind { addr, source })?;
            info!(addr = %mux.local_addr(), "media of every participant on one UDP port");
            Some(mux)
        } else {
            None
        };
        Ok(Arc::new(Sfu {
            config,
            rooms: Mutex::new(HashMap::new()),
            ports,
            mux,
            observer: Mutex::new(None),
            certificate: std::sync::OnceLock::new(),
        }))
    }

    /// The certificate downlinks present (one for all: its fingerprint is in
    /// every downlink offer).
    pub(crate) fn certificate(&self) -> Result<confer_transport::Certificate, SfuError> {
        if let Some(c) = self.certificate.get() {
            return Ok(c.clone());
        }
        let made = confer_transport::Certificate::generate()?;
        Ok(self.certificate.get_or_init(|| made).clone())
    }

    /// The UDP port all media uses, when `udp_mux` is on (the one bound,
    /// if `udp_port` was 0).
    pub fn media_port(&self) -> Option<u16> {
        self.mux.as_ref().map(|m| m.local_addr().port())
    }

    /// The shared media socket's counters, when `udp_mux` is on.
    pub fn media_socket(&self) -> Option<MediaSocket> {
        self.mux.as_ref().map(|m| m.stats())
    }

    /// Lifecycle events from now on. One observer; a second call replaces it.
    pub fn observe(&self) -> mpsc::UnboundedReceiver<Lifecycle> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.observer.lock().unwrap() = Some(tx);
        rx
    }

    fn tell_observer(&self, event: Lifecycle) {
        if let Some(tx) = self.observer.lock().unwrap().as_ref() {
            let _ = tx.send(event);
        }
    }

    pub fn config(&self) -> &SfuConfig {
        &self.config
    }

    pub fn room(&self, id: &str) -> Option<Arc<Room>> {
        self.rooms.lock().unwrap().get(id).cloned()
    }

    pub fn rooms(&self) -> Vec<RoomSummary> {
        let rooms: Vec<_> = self.rooms.lock().unwrap().values().cloned().collect();
        let mut out: Vec<_> = rooms.iter().map(|r| r.summary()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Closes a room for everyone. Returns false if there was no such room.
    pub async fn close_room(&self, id: &str, reason: &str) -> bool {
        let Some(room) = self.rooms.lock().unwrap().remove(id) else {
            return false;
        };
        let members = {
            let mut inner = room.inner.lock().unwrap();
            inner.closed = true;
            inner.participants.clone()
        };
        for p in &members {
            p.leaving.store(true, std::sync::atomic::Ordering::Release);
        }
        for p in members {
            room.leave(&p.id, reason).await;
        }
        info!(room = id, reason, "room closed");
        self.tell_observer(Lifecycle::RoomClosed {
            room: id.to_owned(),
            reason: reason.to_owned(),
        });
        true
    }

    fn room_or_create(self: &Arc<Self>, id: &str) -> Arc<Room> {
        let mut rooms = self.rooms.lock().unwrap();
        rooms
            .entry(id.to_owned())
            .or_insert_with(|| {
                let room = Arc::new(Room {
                    id: id.to_owned(),
                    sfu: Arc::downgrade(self),
                    created_at: SystemTime::now(),
                    inner: Mutex::new(RoomInner::default()),
                    tap: Mutex::new(None),
                    recording: Mutex::new(None),
                });
                tokio::spawn(tick_loop(Arc::downgrade(&room)));
                info!(room = id, "room created");
                self.tell_observer(Lifecycle::RoomOpened {
                    room: id.to_owned(),
                });
                room
            })
            .clone()
    }

    /// Admits a participant: builds its peer connection and tells the room.
    pub async fn join(
        self: &Arc<Self>,
        room_id: &str,
        who: ParticipantInfo,
    ) -> Result<Joined, SfuError> {
        let hidden = who.role.is_hidden();
        // A recorder joins a meeting in progress; it never opens one.
        let room = match hidden {
            true => self
                .room(room_id)
                .ok_or_else(|| SfuError::RoomClosed(room_id.to_owned()))?,
            false => self.room_or_create(room_id),
        };
        {
            let inner = room.inner.lock().unwrap();
            if inner.closed {
                return Err(SfuError::RoomClosed(room_id.to_owned()));
            }
            if !hidden && inner.visible().count() >= self.config.max_participants {
                return Err(SfuError::RoomFull(room_id.to_owned()));
            }
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let participant = peer::connect(self, &room, who, events_tx).await?;
        let admitted = {
            let mut inner = room.inner.lock().unwrap();
            if inner.closed {
                None
            } else {
                let others: Vec<_> = inner.visible().map(|p| room.summarise(p, &inner)).collect();
                inner.participants.push(participant.clone());
                Some((others, inner.tracks.clone()))
            }
        };
        let Some((others, tracks)) = admitted else {
            participant.close().await;
            return Err(SfuError::RoomClosed(room_id.to_owned()));
        };
        if !hidden {
            let me = room.summary_of(&participant);
            self.tell_observer(Lifecycle::Joined {
                room: room_id.to_owned(),
                participant: me.clone(),
            });
            room.broadcast_except(&participant.id, RoomEvent::ParticipantJoined(me));
        }
        for t in tracks {
            participant.subscribe(&t).await;
        }
        info!(room = room_id, participant = %participant.id, name = %participant.info.name, "joined");
        Ok(Joined {
            room,
            participant,
            events: events_rx,
            others,
        })
    }

    fn schedule_removal_if_empty(self: &Arc<Self>, room: &Arc<Room>) {
        let epoch = {
            let mut inner = room.inner.lock().unwrap();
            if inner.visible().next().is_some() {
                return;
            }
            inner.empty_epoch += 1;
            inner.empty_epoch
        };
        let sfu = Arc::downgrade(self);
        let room = Arc::downgrade(room);
        let grace = self.config.empty_room_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let (Some(sfu), Some(room)) = (sfu.upgrade(), room.upgrade()) else {
                return;
            };
            let still_empty = {
                let inner = room.inner.lock().unwrap();
                inner.visible().next().is_none() && inner.empty_epoch == epoch
            };
            if still_empty {
                let removed = {
                    let mut rooms = sfu.rooms.lock().unwrap();
                    let ours = rooms.get(&room.id).is_some_and(|r| Arc::ptr_eq(r, &room));
                    ours && rooms.remove(&room.id).is_some()
                };
                if removed {
                    // Recorders still in it leave with the room.
                    let hidden = {
                        let mut inner = room.inner.lock().unwrap();
                        inner.closed = true;
                        inner.participants.clone()
                    };
                    for p in hidden {
                        room.leave(&p.id, "room_closed").await;
                    }
                    info!(room = %room.id, "empty room removed");
                    sfu.tell_observer(Lifecycle::RoomClosed {
                        room: room.id.clone(),
                        reason: "empty".into(),
                    });
                }
            }
        });
    }
}

impl Room {
    pub fn summary(&self) -> RoomSummary {
        let inner = self.inner.lock().unwrap();
        RoomSummary {
            id: self.id.clone(),
            created_at: self
                .created_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            participants: inner
                .participants
                .iter()
                .map(|p| ParticipantStatus {
                    summary: self.summarise(p, &inner),
                    downlink: Downlink {
                        estimate_bps: p.estimate.bits_per_second(),
                        receiving: inner
                            .tracks
                            .iter()
                            .flat_map(|t| {
                                t.receivers()
                                    .iter()
                                    .filter(|r| r.subscriber == p.id)
                                    .map(|r| r.reception(t))
                                    .collect::<Vec<_>>()
                            })
                            .collect(),
                    },
                })
                .collect(),
        }
    }

    pub fn participant(&self, id: &str) -> Option<Arc<Participant>> {
        let inner = self.inner.lock().unwrap();
        inner.participants.iter().find(|p| p.id == id).cloned()
    }

    /// Participants the others see (recorders are not counted).
    pub fn participant_count(&self) -> usize {
        self.inner.lock().unwrap().visible().count()
    }

    /// Published tracks, for stats and tests.
    pub fn tracks(&self) -> Vec<Arc<Published>> {
        self.inner.lock().unwrap().tracks.clone()
    }

    fn summary_of(&self, p: &Participant) -> ParticipantSummary {
        let inner = self.inner.lock().unwrap();
        self.summarise(p, &inner)
    }

    fn summarise(&self, p: &Participant, inner: &RoomInner) -> ParticipantSummary {
        let (audio_muted, video_muted) = p.muted();
        ParticipantSummary {
            id: p.id.clone(),
            user_id: p.info.user_id.clone(),
            name: p.info.name.clone(),
            role: p.info.role,
            audio_muted,
            video_muted,
            tracks: inner
                .tracks
                .iter()
                .filter(|t| t.publisher == p.id)
                .map(|t| t.info.clone())
                .collect(),
        }
    }

    pub(crate) fn broadcast_except(&self, except: &str, event: RoomEvent) {
        let members = self.inner.lock().unwrap().participants.clone();
        for p in members.iter().filter(|p| p.id != except) {
            p.send(PeerEvent::Room(event.clone()));
        }
    }

    fn broadcast(&self, event: RoomEvent) {
        self.broadcast_except("", event)
    }

    /// Starts tapping the room's media (one tap at a time: a second call
    /// replaces the first). Current tracks are announced first.
    pub fn start_tap(&self) -> mpsc::Receiver<Tapped> {
        let (tx, rx) = mpsc::channel(TAP_CAPACITY);
        *self.tap.lock().unwrap() = Some(tx.clone());
        let (tracks, speaker) = {
            let inner = self.inner.lock().unwrap();
            let tracks: Vec<_> = inner
                .tracks
                .iter()
                .map(|t| (t.clone(), self.tap_track(t, &inner)))
                .collect();
            (tracks, inner.speaker.clone())
        };
        for (t, info) in tracks {
            if let Some(info) = info {
                let _ = tx.try_send(Tapped::Track(info));
            }
            t.tap.store(Some(Arc::new(tx.clone())));
        }
        let _ = tx.try_send(Tapped::Speaker {
            participant_id: speaker,
        });
        rx
    }

    pub fn stop_tap(&self) {
        *self.tap.lock().unwrap() = None;
        for t in self.inner.lock().unwrap().tracks.iter() {
            t.tap.store(None);
        }
    }

    fn tap_send(&self, event: Tapped) {
        if let Some(tx) = self.tap.lock().unwrap().as_ref() {
            let _ = tx.try_send(event);
        }
    }

    fn tap_track(&self, t: &Published, inner: &RoomInner) -> Option<TapTrack> {
        let p = inner.participants.iter().find(|p| p.id == t.publisher)?;
        Some(TapTrack {
            track_id: t.tap_id.clone(),
            participant_id: p.id.clone(),
            user_id: p.info.user_id.clone(),
            name: p.info.name.clone(),
            kind: t.info.kind,
            codec: t.info.codec.clone(),
            clock_rate: t.clock_rate(),
        })
    }

    pub(crate) fn track(&self, track_id: &str) -> Option<Arc<Published>> {
        self.inner
            .lock()
            .unwrap()
            .tracks
            .iter()
            .find(|t| t.info.id == track_id)
            .cloned()
    }

    /// Asks the publisher of `track_id` for a keyframe.
    pub fn request_keyframe(&self, track_id: &str) {
        if let Some(t) = self.track(track_id) {
            t.request_keyframe();
        }
    }

    /// Tells everyone about a recording of this room; `started` and
    /// `stopped` also set what joiners are told ([`Room::recording`]).
    pub fn announce_recording(
        &self,
        state: RecordingState,
        recording_id: &str,
        reason: Option<&str>,
    ) {
        match state {
            RecordingState::Started => {
                *self.recording.lock().unwrap() = Some(recording_id.to_owned())
            }
            RecordingState::Stopped | RecordingState::Failed => {
                *self.recording.lock().unwrap() = None
            }
            RecordingState::Available => {}
        }
        self.broadcast(RoomEvent::Recording {
            state,
            recording_id: recording_id.to_owned(),
            reason: reason.map(str::to_owned),
        });
    }

    /// The id of the recording in progress.
    pub fn recording(&self) -> Option<String> {
        self.recording.lock().unwrap().clone()
    }

    /// Tells everyone the room will close at `closes_at` (Unix seconds).
    pub fn announce_closing(&self, closes_at: u64, reason: &str) {
        self.broadcast(RoomEvent::Closing {
            closes_at,
            reason: reason.to_owned(),
        });
    }

    /// A participant's peer connection delivered a new remote track.
    pub(crate) async fn publish(
        self: &Arc<Self>,
        publisher: &Arc<Participant>,
        remote: Arc<dyn TrackRemote>,
    ) {
        let extensions = publisher.remote_extensions().await;
        let Some(track) = Published::new(publisher, remote, extensions).await else {
            debug!(participant = %publisher.id, "remote track without SSRC or codec ignored");
            return;
        };
        self.publish_track(publisher, track).await;
    }

    /// Adds `track` to the room: forwarded to everyone from now on.
    pub(crate) async fn publish_track(
        self: &Arc<Self>,
        publisher: &Arc<Participant>,
        track: Arc<Published>,
    ) {
        let subscribers = {
            let mut inner = self.inner.lock().unwrap();
            if !inner.participants.iter().any(|p| p.id == publisher.id) {
                return;
            }
            inner.tracks.push(track.clone());
            if let Some(tx) = self.tap.lock().unwrap().as_ref()
                && let Some(info) = self.tap_track(&track, &inner)
            {
                let _ = tx.try_send(Tapped::Track(info));
                track.tap.store(Some(Arc::new(tx.clone())));
            }
            inner
                .participants
                .iter()
                .filter(|p| p.id != publisher.id)
                .cloned()
                .collect::<Vec<_>>()
        };
        info!(room = %self.id, participant = %publisher.id, track = %track.info.id, codec = %track.info.codec, "track published");
        self.broadcast(RoomEvent::TrackPublished {
            participant_id: publisher.id.clone(),
            track: track.info.clone(),
        });
        let room = Arc::downgrade(self);
        let forwarding = track.clone();
        tokio::spawn(async move {
            forwarding.clone().forward().await;
            if let Some(room) = room.upgrade() {
                room.unpublish(&forwarding).await;
            }
        });
        for s in subscribers {
            s.subscribe(&track).await;
        }
    }

    async fn unpublish(&self, track: &Arc<Published>) {
        let was_present = {
            let mut inner = self.inner.lock().unwrap();
            let before = inner.tracks.len();
            inner.tracks.retain(|t| !Arc::ptr_eq(t, track));
            inner.tracks.len() != before
        };
        if !was_present {
            return;
        }
        track.tap.store(None);
        self.tap_send(Tapped::TrackEnded {
            track_id: track.tap_id.clone(),
        });
        self.broadcast(RoomEvent::TrackRemoved {
            participant_id: track.publisher.clone(),
            track_id: track.info.id.clone(),
        });
        let members = self.inner.lock().unwrap().participants.clone();
        for m in members {
            m.unsubscribe(track).await;
        }
    }

    /// Removes a participant: its tracks go, its connection closes, the
    /// others are told. Idempotent.
    pub async fn leave(self: &Arc<Self>, participant_id: &str, reason: &str) {
        let (p, own_tracks, others_tracks) = {
            let mut inner = self.inner.lock().unwrap();
            let Some(i) = inner
                .participants
                .iter()
                .position(|p| p.id == participant_id)
            else {
                return;
            };
            let p = inner.participants.remove(i);
            let (own, others): (Vec<_>, Vec<_>) = inner
                .tracks
                .iter()
                .cloned()
                .partition(|t| t.publisher == participant_id);
            inner.tracks.retain(|t| t.publisher != participant_id);
            if inner.speaker.as_deref() == Some(participant_id) {
                inner.speaker = None;
            }
            (p, own, others)
        };
        for t in &others_tracks {
            t.remove_receiver(participant_id);
        }
        let members = self.inner.lock().unwrap().participants.clone();
        for t in &own_tracks {
            t.tap.store(None);
            self.tap_send(Tapped::TrackEnded {
                track_id: t.tap_id.clone(),
            });
            self.broadcast(RoomEvent::TrackRemoved {
                participant_id: participant_id.to_owned(),
                track_id: t.info.id.clone(),
            });
            for m in &members {
                let started = std::time::Instant::now();
                m.unsubscribe(t).await;
                warn_if_slow(started, &m.id, "unsubscribing a track of one who left");
            }
        }
        if reason != "left" {
            p.send(PeerEvent::Removed {
                reason: reason.to_owned(),
            });
        }
        let started = std::time::Instant::now();
        p.close().await;
        warn_if_slow(started, participant_id, "closing the peer connection");
        info!(room = %self.id, participant = participant_id, reason, "left");
        if p.info.role.is_hidden() {
            return;
        }
        self.broadcast(RoomEvent::ParticipantLeft {
            participant_id: participant_id.to_owned(),
            reason: reason.to_owned(),
        });
        if let Some(sfu) = self.sfu.upgrade() {
            sfu.tell_observer(Lifecycle::Left {
                room: self.id.clone(),
                participant_id: participant_id.to_owned(),
                user_id: p.info.user_id.clone(),
                reason: reason.to_owned(),
            });
            sfu.schedule_removal_if_empty(self);
        }
    }

    pub(crate) fn muted_changed(&self, participant_id: &str, kind: TrackKind, muted: bool) {
        self.broadcast_except(
            participant_id,
            RoomEvent::Muted {
                participant_id: participant_id.to_owned(),
                kind,
                muted,
            },
        );
    }

    /// Gives each receiver with a bandwidth estimate the video layers that
    /// fit in it, after the audio it receives.
    fn allocate_bandwidth(&self) {
        let (participants, tracks, speaker) = {
            let inner = self.inner.lock().unwrap();
            (
                inner.participants.clone(),
                inner.tracks.clone(),
                inner.speaker.clone(),
            )
        };
        let now = std::time::Instant::now();
        type Wants = (u64, Vec<(Arc<Published>, Arc<Receiver>, Demand)>);
        let mut wants: HashMap<&str, Wants> = participants
            .iter()
            .filter(|p| p.estimate.bits_per_second().is_some())
            .map(|p| (p.id.as_str(), (0, Vec::new())))
            .collect();
        if wants.is_empty() {
            return;
        }
        for t in &tracks {
            let rates = bandwidth::rates(t.layers.rates(), t.layers.flowing(now));
            let speaks = speaker.as_deref() == Some(t.publisher.as_str());
            for r in t.receivers().iter() {
                let Some((audio, video)) = wants.get_mut(r.subscriber.as_str()) else {
                    continue;
                };
                match t.info.kind {
                    TrackKind::Audio => *audio += rates[0] as u64,
                    TrackKind::Video => video.push((t.clone(), r.clone(), r.demand(rates, speaks))),
                }
            }
        }
        for p in &participants {
            let (Some(bps), Some((audio, video))) =
                (p.estimate.bits_per_second(), wants.get(p.id.as_str()))
            else {
                continue;
            };
            trace!(participant = %p.id, estimate = bps, audio, "bandwidth");
            let demands: Vec<Demand> = video.iter().map(|(_, _, d)| *d).collect();
            let mut backoff = p.backoff.lock().unwrap();
            let upgrades = backoff.may_upgrade(now);
            let layers = bandwidth::allocate(bps.saturating_sub(*audio), &demands, upgrades);
            let (mut down, mut up) = (false, false);
            for ((t, r, d), layer) in video.iter().zip(layers) {
                let layer = r.allow(d, layer, &t.info.id, now);
                let (lowered, raised) = bandwidth::change(d, layer);
                (down, up) = (down || lowered, up || raised);
                if (d.allowed == simulcast::OFF) != (layer == simulcast::OFF) {
                    info!(participant = %p.id, track = %t.info.id, estimate = bps,
                        paused = layer == simulcast::OFF, "video paused or resumed for the downlink");
                    p.send(PeerEvent::VideoPaused {
                        track_id: t.info.id.clone(),
                        paused: layer == simulcast::OFF,
                    });
                }
            }
            if down || up {
                debug!(participant = %p.id, estimate = bps, audio, down, up, "bandwidth allocation changed");
            }
            backoff.record(now, down, up);
        }
    }

    /// Forwards only the room's `audio_last_n` loudest microphones.
    fn update_audible(&self) {
        let n = self.sfu.upgrade().map_or(0, |s| s.config.audio_last_n);
        let inner = self.inner.lock().unwrap();
        let audio: Vec<&Arc<Published>> = inner
            .tracks
            .iter()
            .filter(|t| t.info.kind == TrackKind::Audio)
            .collect();
        let levels: Vec<(u32, bool)> = audio.iter().map(|t| (t.peak(), t.is_audible())).collect();
        for (t, audible) in audio.iter().zip(crate::forward::loudest(&levels, n)) {
            t.set_audible(audible);
        }
    }

    /// Picks the loudest audio publisher, with hysteresis so the highlight
    /// does not flicker between two people talking over each other.
    fn update_speaker(&self) {
        const SPEAKING: u32 = 40; // loudness above ~87 dBov below full scale
        const MARGIN: u32 = 6;
        let event = {
            let mut inner = self.inner.lock().unwrap();
            let loudest = inner
                .tracks
                .iter()
                .filter(|t| t.info.kind == TrackKind::Audio)
                .map(|t| (t.publisher.clone(), t.loudness()))
                .max_by_key(|(_, l)| *l);
            let current_level = inner.speaker.as_ref().and_then(|s| {
                inner
                    .tracks
                    .iter()
                    .find(|t| &t.publisher == s && t.info.kind == TrackKind::Audio)
                    .map(|t| t.loudness())
            });
            match loudest {
                Some((who, level))
                    if level >= SPEAKING
                        && inner.speaker.as_ref() != Some(&who)
                        && current_level.is_none_or(|c| level > c + MARGIN) =>
                {
                    inner.speaker = Some(who.clone());
                    Some(Some(who))
                }
                _ => None,
            }
        };
        if let Some(participant_id) = event {
            self.tap_send(Tapped::Speaker {
                participant_id: participant_id.clone(),
            });
            self.broadcast(RoomEvent::ActiveSpeaker { participant_id });
        }
    }
}

/// A step of someone leaving that should take milliseconds: when one took
/// seconds, everyone else's removal waited for it (a meeting ending closes
/// its participants one after the other).
fn warn_if_slow(started: std::time::Instant, participant: &str, what: &str) {
    let took = started.elapsed();
    if took > Duration::from_secs(1) {
        warn!(participant, ?took, "slow: {what}");
    }
}

/// The room's periodic work: the microphones forwarded (every tick, so a
/// new voice waits little), the active speaker, the layers that fit each
/// receiver's bandwidth.
async fn tick_loop(room: Weak<Room>) {
    const TICK: Duration = Duration::from_millis(125);
    const SPEAKER_EVERY: u128 = 2;
    let mut tick = tokio::time::interval(TICK);
    let allocate_every = (bandwidth::ALLOCATE_EVERY.as_millis() / TICK.as_millis()).max(1);
    for n in 0u128.. {
        tick.tick().await;
        let Some(room) = room.upgrade() else { return };
        room.update_audible();
        if n % SPEAKER_EVERY == 0 {
            room.update_speaker();
        }
        if n % allocate_every == 0 {
            room.allocate_bandwidth();
        }
    }
}
