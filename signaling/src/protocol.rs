//! The WebSocket messages, as documented in `docs/signaling.md`.
//! Every message is a JSON object with a `type` field.

use confer_sfu::{IceServer, ParticipantSummary, RTCIceCandidateInit, Role, TrackInfo, TrackKind};
use serde::{Deserialize, Serialize};

/// Largest message a client may send; larger ones get `message_too_large`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Join {
        token: String,
        /// If given, must match the token's room.
        #[serde(default)]
        room: Option<String>,
    },
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    Candidate {
        candidate: RTCIceCandidateInit,
    },
    Mute {
        kind: TrackKind,
        muted: bool,
    },
    Leave {},
    Ping {},
}

/// The `type` values a client may send, to tell unknown types from bad fields.
pub const CLIENT_TYPES: &[&str] = &[
    "join",
    "offer",
    "answer",
    "candidate",
    "mute",
    "leave",
    "ping",
];

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Joined {
        participant_id: String,
        room: String,
        name: String,
        role: Role,
        participants: Vec<ParticipantSummary>,
        ice_servers: Vec<IceServer>,
    },
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    Candidate {
        candidate: RTCIceCandidateInit,
    },
    ParticipantJoined {
        participant: ParticipantSummary,
    },
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
    Mute {
        participant_id: String,
        kind: TrackKind,
        muted: bool,
    },
    ActiveSpeaker {
        participant_id: Option<String>,
    },
    /// This participant was removed by the server; the socket closes next.
    Removed {
        reason: String,
    },
    Pong {},
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    BadMessage,
    UnknownType,
    MessageTooLarge,
    TokenInvalid,
    TokenExpired,
    WrongRoom,
    NotJoined,
    AlreadyJoined,
    BadSdp,
    BadCandidate,
    RoomFull,
    RoomClosed,
    Internal,
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error {
            code,
            message: message.into(),
        }
    }
}
