//! Where the rooms live: this process's SFU (`confer serve`), or SFU nodes
//! on other machines (`confer signaling`, through [`crate::nodes`]).
//! Sessions, meetings, recordings and the admin API ask [`Media`], and the
//! two cases differ only here.

use crate::nodes::Nodes;
use crate::protocol::{ErrorCode, ServerMessage};
use chrono::SecondsFormat;
use confer_sfu::simulcast::Quality;
use confer_sfu::{
    Lifecycle, Participant, ParticipantInfo, ParticipantSummary, PeerEvent, RTCIceCandidateInit,
    RecordingState, Role, Room, RoomEvent, RoomSummary, Sfu, SfuError, TrackKind,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Clone)]
pub enum Media {
    Local(Arc<Sfu>),
    Remote(Arc<Nodes>),
}

/// What a participant's session asks of its peer connection; also the
/// messages signaling sends an SFU node (`docs/sfu-nodes.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToNode {
    /// First on a session socket: who joins which room (already admitted).
    Join {
        room: String,
        user_id: String,
        name: String,
        role: Role,
        /// It receives on a downlink of its own.
        #[serde(default)]
        downlink: bool,
    },
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    DownlinkAnswer {
        sdp: String,
    },
    Candidate {
        candidate: RTCIceCandidateInit,
    },
    Mute {
        kind: TrackKind,
        muted: bool,
    },
    VideoQuality {
        track_id: String,
        quality: Quality,
    },
    Leave {
        reason: String,
    },
}

/// An SFU node's answer to [`ToNode::Join`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JoinAnswer {
    Joined {
        participant_id: String,
        /// Everyone already in the room.
        participants: Vec<ParticipantSummary>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recording: Option<String>,
    },
    Refused {
        code: ErrorCode,
        message: String,
    },
}

/// Something everyone in a room is told, sent to the node holding it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Announcement {
    /// A recording `started`, `stopped`, became `available`, or `failed`.
    Recording {
        state: RecordingState,
        recording_id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// The room closes at `closes_at` (Unix seconds).
    Closing { closes_at: u64, reason: String },
}

/// A participant admitted to a room.
pub struct Joined {
    pub participant_id: String,
    pub others: Vec<ParticipantSummary>,
    pub recording: Option<String>,
    pub link: Link,
    pub events: Events,
}

/// How a session reaches its participant's peer connection.
pub enum Link {
    Local(Arc<Participant>),
    /// The session socket to the node; dropping it makes the node remove
    /// the participant.
    Remote(mpsc::UnboundedSender<ToNode>),
}

/// What a session passes on to its client.
pub enum Events {
    Local(mpsc::UnboundedReceiver<PeerEvent>),
    Remote(mpsc::UnboundedReceiver<ServerMessage>),
}

impl Events {
    /// `None` when the media plane lost the participant without a word
    /// (its node went away): the client should reconnect.
    pub async fn recv(&mut self) -> Option<ServerMessage> {
        match self {
            Events::Local(rx) => rx.recv().await.map(to_client),
            Events::Remote(rx) => rx.recv().await,
        }
    }
}

impl Link {
    /// Applies `op`; a refusal is the error message for the client. A node
    /// answers refusals on the event stream instead.
    pub async fn send(&self, op: ToNode) -> Result<(), ServerMessage> {
        match self {
            Link::Local(p) => apply(p, op).await,
            Link::Remote(tx) => {
                let _ = tx.send(op);
                Ok(())
            }
        }
    }

    pub async fn leave(self, reason: &str) {
        match self {
            Link::Local(p) => p.leave(reason).await,
            Link::Remote(tx) => {
                let _ = tx.send(ToNode::Leave {
                    reason: reason.to_owned(),
                });
            }
        }
    }
}

/// Carries out a session's request on its participant.
pub async fn apply(p: &Participant, op: ToNode) -> Result<(), ServerMessage> {
    let result = match op {
        ToNode::Offer { sdp } => p.handle_offer(sdp).await,
        ToNode::Answer { sdp } => p.handle_answer(sdp).await,
        ToNode::DownlinkAnswer { sdp } => p.handle_downlink_answer(sdp).await,
        ToNode::Candidate { candidate } => p.add_ice_candidate(candidate).await,
        ToNode::Mute { kind, muted } => {
            p.set_muted(kind, muted);
            Ok(())
        }
        ToNode::VideoQuality { track_id, quality } => p.set_quality(&track_id, quality),
        ToNode::Join { .. } | ToNode::Leave { .. } => Ok(()),
    };
    result.map_err(|e| {
        let code = match e {
            SfuError::BadSdp(_) => ErrorCode::BadSdp,
            SfuError::BadCandidate(_) => ErrorCode::BadCandidate,
            SfuError::UnknownTrack(_) => ErrorCode::UnknownTrack,
            _ => ErrorCode::Internal,
        };
        let message = match e {
            SfuError::BadSdp(m) | SfuError::BadCandidate(m) => m,
            e => e.to_string(),
        };
        ServerMessage::error(code, message)
    })
}

/// Joins `room` on this process's SFU.
pub async fn join_local(
    sfu: &Arc<Sfu>,
    room: &str,
    info: ParticipantInfo,
) -> Result<Joined, Refusal> {
    let j = sfu.join(room, info).await.map_err(|e| {
        let code = match e {
            SfuError::RoomFull(_) => ErrorCode::RoomFull,
            SfuError::RoomClosed(_) => ErrorCode::RoomClosed,
            SfuError::DownlinkNeedsMux => ErrorCode::BadMessage,
            _ => ErrorCode::Internal,
        };
        Refusal {
            code,
            message: e.to_string(),
        }
    })?;
    Ok(Joined {
        participant_id: j.participant.id.clone(),
        others: j.others,
        recording: j.room.recording(),
        link: Link::Local(j.participant),
        events: Events::Local(j.events),
    })
}

/// Why a join failed, for the client.
#[derive(Debug)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// Why an admin or moderator request on a room failed.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error("no room {0:?}")]
    NoRoom(String),
    #[error("no participant {0:?} in this room")]
    NoParticipant(String),
    #[error("the SFU node holding the room did not answer: {0}")]
    Unreachable(String),
}

impl Media {
    pub async fn join(&self, room: &str, info: ParticipantInfo) -> Result<Joined, Refusal> {
        match self {
            Media::Local(sfu) => join_local(sfu, room, info).await,
            Media::Remote(nodes) => nodes.join(room, info).await,
        }
    }

    /// Room lifecycle from now on, for [`crate::meeting::Meetings::follow`].
    pub fn observe(&self) -> mpsc::UnboundedReceiver<Lifecycle> {
        match self {
            Media::Local(sfu) => sfu.observe(),
            Media::Remote(nodes) => nodes.observe(),
        }
    }

    /// The SFU of this process, for the in-process recorder.
    pub fn local_room(&self, id: &str) -> Option<Arc<Room>> {
        match self {
            Media::Local(sfu) => sfu.room(id),
            Media::Remote(_) => None,
        }
    }

    pub fn has_room(&self, id: &str) -> bool {
        match self {
            Media::Local(sfu) => sfu.room(id).is_some(),
            Media::Remote(nodes) => nodes.has_room(id),
        }
    }

    pub fn room_count(&self) -> usize {
        match self {
            Media::Local(sfu) => sfu.rooms().len(),
            Media::Remote(nodes) => nodes.room_count(),
        }
    }

    pub async fn rooms(&self) -> Result<Vec<RoomSummary>, RoomError> {
        match self {
            Media::Local(sfu) => Ok(sfu.rooms()),
            Media::Remote(nodes) => nodes.rooms().await,
        }
    }

    pub async fn room(&self, id: &str) -> Result<RoomSummary, RoomError> {
        match self {
            Media::Local(sfu) => sfu
                .room(id)
                .map(|r| r.summary())
                .ok_or_else(|| RoomError::NoRoom(id.to_owned())),
            Media::Remote(nodes) => nodes.room(id).await,
        }
    }

    /// Closes a room for everyone.
    pub async fn close_room(&self, id: &str, reason: &str) -> Result<(), RoomError> {
        match self {
            Media::Local(sfu) => match sfu.close_room(id, reason).await {
                true => Ok(()),
                false => Err(RoomError::NoRoom(id.to_owned())),
            },
            Media::Remote(nodes) => nodes.close_room(id, reason).await,
        }
    }

    pub async fn remove(
        &self,
        room: &str,
        participant: &str,
        reason: &str,
    ) -> Result<(), RoomError> {
        match self {
            Media::Local(sfu) => {
                let (r, _) = find_local(sfu, room, participant)?;
                r.leave(participant, reason).await;
                Ok(())
            }
            Media::Remote(nodes) => nodes.remove(room, participant, reason).await,
        }
    }

    /// A moderator (`by`) mutes someone's microphone.
    pub async fn force_mute(
        &self,
        room: &str,
        participant: &str,
        by: &str,
    ) -> Result<(), RoomError> {
        match self {
            Media::Local(sfu) => {
                find_local(sfu, room, participant)?.1.force_mute(by);
                Ok(())
            }
            Media::Remote(nodes) => nodes.force_mute(room, participant, by).await,
        }
    }

    /// Tells everyone in `room`; nothing happens if it is gone.
    pub fn announce(&self, room: &str, what: Announcement) {
        match self {
            Media::Local(sfu) => {
                if let Some(r) = sfu.room(room) {
                    announce_local(&r, what);
                }
            }
            Media::Remote(nodes) => nodes.announce(room, what),
        }
    }
}

/// A participant of a room of this process's SFU.
pub fn find_local(
    sfu: &Sfu,
    room: &str,
    participant: &str,
) -> Result<(Arc<Room>, Arc<Participant>), RoomError> {
    let r = sfu
        .room(room)
        .ok_or_else(|| RoomError::NoRoom(room.into()))?;
    let p = r
        .participant(participant)
        .ok_or_else(|| RoomError::NoParticipant(participant.into()))?;
    Ok((r, p))
}

pub fn announce_local(room: &Room, what: Announcement) {
    match what {
        Announcement::Recording {
            state,
            recording_id,
            reason,
        } => room.announce_recording(state, &recording_id, reason.as_deref()),
        Announcement::Closing { closes_at, reason } => room.announce_closing(closes_at, &reason),
    }
}

/// An SFU event as the client is told it.
pub fn to_client(evt: PeerEvent) -> ServerMessage {
    match evt {
        PeerEvent::Offer(sdp) => ServerMessage::Offer { sdp },
        PeerEvent::Answer(sdp) => ServerMessage::Answer { sdp },
        PeerEvent::DownlinkOffer(sdp) => ServerMessage::DownlinkOffer { sdp },
        PeerEvent::IceCandidate(candidate) => ServerMessage::Candidate { candidate },
        PeerEvent::Removed { reason } => ServerMessage::Removed { reason },
        PeerEvent::MutedByModerator { by, kind } => ServerMessage::MutedByModerator { by, kind },
        PeerEvent::VideoPaused { track_id, paused } => ServerMessage::VideoPaused {
            track_id,
            reason: "bandwidth".into(),
            paused,
        },
        PeerEvent::Room(e) => match e {
            RoomEvent::ParticipantJoined(participant) => {
                ServerMessage::ParticipantJoined { participant }
            }
            RoomEvent::ParticipantLeft {
                participant_id,
                reason,
            } => ServerMessage::ParticipantLeft {
                participant_id,
                reason,
            },
            RoomEvent::TrackPublished {
                participant_id,
                track,
            } => ServerMessage::TrackPublished {
                participant_id,
                track,
            },
            RoomEvent::TrackRemoved {
                participant_id,
                track_id,
            } => ServerMessage::TrackRemoved {
                participant_id,
                track_id,
            },
            RoomEvent::Muted {
                participant_id,
                kind,
                muted,
            } => ServerMessage::Mute {
                participant_id,
                kind,
                muted,
            },
            RoomEvent::ActiveSpeaker { participant_id } => {
                ServerMessage::ActiveSpeaker { participant_id }
            }
            RoomEvent::Recording {
                state,
                recording_id,
                reason,
            } => ServerMessage::Recording {
                state,
                recording_id,
                reason,
            },
            RoomEvent::Closing { closes_at, reason } => ServerMessage::MeetingEnding {
                closes_at: chrono::DateTime::from_timestamp(closes_at as i64, 0)
                    .unwrap_or_default()
                    .to_rfc3339_opts(SecondsFormat::Secs, true),
                reason,
            },
        },
    }
}
