//! The WebSocket messages, as documented in `docs/signaling.md`.
//! Every message is a JSON object with a `type` field.

use confer_sfu::simulcast::Quality;
use confer_sfu::{
    IceServer, ParticipantSummary, RTCIceCandidateInit, RecordingState, Role, TrackInfo, TrackKind,
};
use serde::{Deserialize, Serialize};

/// Largest message a client may send; larger ones get `message_too_large`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Offers and answers may be larger: a browser's SDP takes about 2.3 KB per
/// m-line, two per other participant, so a 30-person meeting needs ~140 KB.
pub const MAX_SDP_MESSAGE_BYTES: usize = 1000 * 1024;
/// The messages that carry SDP, allowed up to [`MAX_SDP_MESSAGE_BYTES`].
pub const SDP_TYPES: &[&str] = &["offer", "answer", "downlink_answer"];

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    Join {
        token: String,
        /// If given, must match the token's room.
        #[serde(default)]
        room: Option<String>,
        /// Receive on a second connection the server offers
        /// (`downlink_offer`), not on the one the client publishes on.
        #[serde(default)]
        downlink: bool,
    },
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    /// The answer to a `downlink_offer`.
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
    Leave {},
    Ping {},
    /// Which simulcast layer to receive of a video track.
    VideoQuality {
        track_id: String,
        quality: Quality,
    },
    /// Moderators only: mute someone's microphone.
    MuteParticipant {
        participant_id: String,
        kind: TrackKind,
    },
    /// Moderators only.
    RemoveParticipant {
        participant_id: String,
    },
    /// Moderators only: close the room for everyone.
    EndMeeting {},
    /// Moderators only.
    StartRecording {},
    StopRecording {},
}

/// The `type` values a client may send, to tell unknown types from bad fields.
pub const CLIENT_TYPES: &[&str] = &[
    "join",
    "offer",
    "answer",
    "downlink_answer",
    "candidate",
    "mute",
    "leave",
    "ping",
    "video_quality",
    "mute_participant",
    "remove_participant",
    "end_meeting",
    "start_recording",
    "stop_recording",
];

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Joined {
        participant_id: String,
        room: String,
        name: String,
        role: Role,
        participants: Vec<ParticipantSummary>,
        ice_servers: Vec<IceServer>,
        /// The scheduled meeting admitted to; absent for calls.
        #[serde(skip_serializing_if = "Option::is_none")]
        meeting: Option<MeetingInfo>,
        /// The id of the recording in progress, if the room is being recorded.
        #[serde(skip_serializing_if = "Option::is_none")]
        recording: Option<String>,
    },
    Offer {
        sdp: String,
    },
    Answer {
        sdp: String,
    },
    /// An offer of the downlink (for a client that joined with `downlink`).
    DownlinkOffer {
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
    /// A moderator muted this participant; the client should mute its microphone.
    MutedByModerator {
        by: String,
        kind: TrackKind,
    },
    /// A recording of the room `started`, `stopped`, became `available`
    /// (listed and downloadable), or `failed`.
    Recording {
        state: RecordingState,
        recording_id: String,
        /// Why a recording `stopped`, when a moderator did not stop it.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A video track is not sent to this participant because it does not
    /// fit in its downlink (`paused`), or is sent again.
    VideoPaused {
        track_id: String,
        paused: bool,
        reason: String,
    },
    /// The room closes at `closes_at` (RFC 3339).
    MeetingEnding {
        closes_at: String,
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
    Forbidden,
    UnknownParticipant,
    UnknownTrack,
    RecordingDisabled,
    AlreadyRecording,
    NotRecording,
    RecordingSpoolFull,
    NoRecorder,
    MeetingNotFound,
    MeetingNotStarted,
    MeetingEnded,
    MeetingCancelled,
    NotInvited,
    HomeServerUnreachable,
    HomeServerError,
    /// `confer signaling` cannot reach an SFU node for the room.
    SfuUnavailable,
    Internal,
}

impl ErrorCode {
    /// The code for a schedule refusal or failure.
    pub fn from_schedule(code: &str) -> ErrorCode {
        match code {
            "meeting_not_found" => ErrorCode::MeetingNotFound,
            "meeting_not_started" => ErrorCode::MeetingNotStarted,
            "meeting_ended" => ErrorCode::MeetingEnded,
            "meeting_cancelled" => ErrorCode::MeetingCancelled,
            "not_invited" => ErrorCode::NotInvited,
            "home_server_unreachable" => ErrorCode::HomeServerUnreachable,
            _ => ErrorCode::HomeServerError,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeetingInfo {
    pub title: String,
    /// RFC 3339, UTC.
    pub start: String,
    pub end: String,
    /// When the room closes: the end plus the grace period.
    pub closes_at: String,
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client message in docs/signaling.md is one the server accepts,
    /// and every type documented there is one the code knows.
    #[test]
    fn documented_messages_are_the_real_ones() {
        let doc = crate::doc_examples::read("signaling.md");
        let (client_part, server_part) = doc.split_once("## Server → client").unwrap();
        let messages = |part: &str| -> Vec<serde_json::Value> {
            crate::doc_examples::fenced(part)
                .into_iter()
                .filter(|(lang, _)| lang == "json")
                .flat_map(|(_, body)| {
                    // One message per line, or one pretty-printed message.
                    match serde_json::from_str::<serde_json::Value>(&body) {
                        Ok(v) => vec![v],
                        Err(_) => body
                            .lines()
                            .map(|l| serde_json::from_str(l).unwrap())
                            .collect(),
                    }
                })
                .filter(|v: &serde_json::Value| v.get("type").is_some())
                .collect()
        };
        let client = messages(client_part.split_once("## Client → server").unwrap().1);
        assert!(client.len() >= 10, "{client:?}");
        for m in client {
            let parsed: Result<ClientMessage, _> = serde_json::from_value(m.clone());
            assert!(
                parsed.is_ok(),
                "documented client message refused: {m}: {parsed:?}"
            );
        }
        let server = messages(server_part.split_once("## Tokens").unwrap().0);
        let known = [
            "joined",
            "offer",
            "answer",
            "candidate",
            "participant_joined",
            "participant_left",
            "track_published",
            "track_removed",
            "mute",
            "active_speaker",
            "removed",
            "pong",
            "error",
            "muted_by_moderator",
            "meeting_ending",
            "recording",
            "video_paused",
            "downlink_offer",
        ];
        for m in &server {
            assert!(
                known.contains(&m["type"].as_str().unwrap()),
                "undocumented type {m}"
            );
        }
        // And the server's own messages serialise to those shapes.
        let ours = serde_json::to_value(ServerMessage::MeetingEnding {
            closes_at: "2026-11-24T10:15:00Z".into(),
            reason: "the meeting's scheduled time is over".into(),
        })
        .unwrap();
        assert!(
            server.contains(&ours),
            "meeting_ending example differs from {ours}"
        );
        let paused = serde_json::to_value(ServerMessage::VideoPaused {
            track_id: "p7d1k2x9q0-5266e793".into(),
            paused: true,
            reason: "bandwidth".into(),
        })
        .unwrap();
        assert!(
            server.contains(&paused),
            "video_paused differs from {paused}"
        );
        let code = serde_json::to_value(ErrorCode::HomeServerUnreachable).unwrap();
        assert!(doc.contains(&format!("`{}`", code.as_str().unwrap())));
    }
}
