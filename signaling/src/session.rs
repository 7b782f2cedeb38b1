//! One client's WebSocket: parses what it sends, admits it to a room, and
//! relays the SFU's events back. A bad message costs that client an error
//! message, never the connection of anyone else.

use crate::AppState;
use crate::media::{Events, Joined, Link, RoomError, ToNode};
use crate::meeting::ENDED_BY_MODERATOR;
use crate::protocol::{
    CLIENT_TYPES, ClientMessage, ErrorCode, MAX_MESSAGE_BYTES, MAX_SDP_MESSAGE_BYTES, MeetingInfo,
    SDP_TYPES, ServerMessage,
};
use crate::schedule::Identity;
use crate::token::JoinKind;
use axum::extract::ws::{Message, WebSocket};
use chrono::{SecondsFormat, Utc};
use confer_sfu::{ParticipantInfo, Role, TrackKind};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// A socket silent this long is dead (browsers answer our pings, so a live
/// one never is). Together with the ICE timeout this removes a vanished
/// participant within 15 s.
const IDLE_TIMEOUT: Duration = Duration::from_secs(12);
const PING_EVERY: Duration = Duration::from_secs(4);

pub async fn run(socket: WebSocket, state: AppState) {
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();

    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m {
                    Some(Some(m)) => Message::Text(serde_json::to_string(&m).unwrap_or_default().into()),
                    Some(None) | None => {
                        let _ = sink.send(Message::Close(None)).await;
                        return;
                    }
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            if sink.send(msg).await.is_err() {
                return;
            }
        }
    });

    let mut session = Session {
        state,
        out: out_tx,
        joined: None,
        meeting_title: None,
    };
    let mut events: Option<Events> = None;
    let reason = loop {
        tokio::select! {
            incoming = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => {
                match incoming {
                    Err(_) => break "connection lost",
                    Ok(None) | Ok(Some(Err(_))) => break "disconnected",
                    Ok(Some(Ok(Message::Text(text)))) => {
                        match session.handle_text(text.as_str()).await {
                            Flow::Continue => {}
                            Flow::Joined(rx) => events = Some(rx),
                            Flow::Leave => break "left",
                        }
                    }
                    Ok(Some(Ok(Message::Binary(_)))) => {
                        session.send(ServerMessage::error(ErrorCode::BadMessage, "binary messages are not accepted; send JSON text"));
                    }
                    Ok(Some(Ok(Message::Close(_)))) => break "disconnected",
                    Ok(Some(Ok(_))) => {} // ping/pong: liveness only
                }
            }
            evt = next_event(&mut events) => match evt {
                Some(ServerMessage::Removed { reason }) => {
                    session.send(ServerMessage::Removed { reason });
                    session.joined = None; // already out of the room
                    break "removed";
                }
                Some(msg) => session.send(msg),
                // Its SFU node is gone: closing the socket makes the client
                // reconnect, and join again on another node.
                None => break "media server lost",
            }
        }
    };
    if let Some(me) = session.joined.take() {
        me.link.leave(reason).await;
    }
    let _ = session.out.send(None);
    let _ = writer.await;
    debug!(reason, "websocket session ended");
}

async fn next_event(events: &mut Option<Events>) -> Option<ServerMessage> {
    match events {
        Some(e) => e.recv().await,
        None => std::future::pending().await,
    }
}

/// `None` closes the socket.
type Outgoing = Option<ServerMessage>;

enum Moderation {
    Mute(String, TrackKind),
    Remove(String),
    End,
    Record(bool),
}

enum Flow {
    Continue,
    Joined(Events),
    Leave,
}

/// This session's participant.
struct Me {
    id: String,
    room: String,
    user_id: String,
    role: Role,
    link: Link,
}

struct Session {
    state: AppState,
    out: mpsc::UnboundedSender<Outgoing>,
    joined: Option<Me>,
    /// The scheduled meeting's title, to name recordings after.
    meeting_title: Option<String>,
}

impl Session {
    fn send(&self, msg: ServerMessage) {
        let _ = self.out.send(Some(msg));
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>) -> Flow {
        let message = message.into();
        debug!(?code, %message, "client error");
        self.send(ServerMessage::error(code, message));
        Flow::Continue
    }

    async fn handle_text(&mut self, text: &str) -> Flow {
        let too_large = |limit: usize| {
            ServerMessage::error(
                ErrorCode::MessageTooLarge,
                format!("message is {} bytes; the limit is {limit}", text.len()),
            )
        };
        if text.len() > MAX_SDP_MESSAGE_BYTES {
            self.send(too_large(MAX_SDP_MESSAGE_BYTES));
            return Flow::Continue;
        }
        let value: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return self.error(ErrorCode::BadJson, format!("not valid JSON: {e}")),
        };
        let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
            return self.error(
                ErrorCode::BadMessage,
                "a message must be a JSON object with a string \"type\"",
            );
        };
        if text.len() > MAX_MESSAGE_BYTES && !SDP_TYPES.contains(&kind) {
            self.send(too_large(MAX_MESSAGE_BYTES));
            return Flow::Continue;
        }
        if !CLIENT_TYPES.contains(&kind) {
            return self.error(
                ErrorCode::UnknownType,
                format!("unknown message type {kind:?}"),
            );
        }
        let kind = kind.to_owned();
        let msg: ClientMessage = match serde_json::from_value(value) {
            Ok(m) => m,
            Err(e) => {
                return self.error(ErrorCode::BadMessage, format!("bad {kind:?} message: {e}"));
            }
        };
        match msg {
            ClientMessage::Join {
                token,
                room,
                downlink,
            } => self.join(&token, room, downlink).await,
            ClientMessage::Ping {} => {
                self.send(ServerMessage::Pong {});
                Flow::Continue
            }
            msg => {
                if self.joined.is_none() {
                    return self.error(
                        ErrorCode::NotJoined,
                        format!("send \"join\" before {kind:?}"),
                    );
                }
                self.in_room(msg).await
            }
        }
    }

    async fn join(&mut self, token: &str, room: Option<String>, downlink: bool) -> Flow {
        if self.joined.is_some() {
            return self.error(
                ErrorCode::AlreadyJoined,
                "this connection has already joined a room",
            );
        }
        let claims = match self.state.tokens.verify(token) {
            Ok(c) => c,
            Err(e) => {
                let code = match e.code() {
                    "token_expired" => ErrorCode::TokenExpired,
                    _ => ErrorCode::TokenInvalid,
                };
                return self.error(code, e.to_string());
            }
        };
        if let Some(r) = room
            && r != claims.room
        {
            return self.error(
                ErrorCode::WrongRoom,
                format!("the token is for room {:?}, not {r:?}", claims.room),
            );
        }
        // Meetings are checked against the home server's schedule, which
        // also decides the role; calls are admitted by their token alone.
        let mut role = claims.role;
        let mut meeting = None;
        let mut closes_at = None;
        if let (JoinKind::Meeting, Some(schedule)) = (claims.kind, &self.state.schedule) {
            let who = Identity {
                user_id: &claims.sub,
                email: claims.email.as_deref(),
            };
            match schedule.admit(&claims.room, who, Utc::now()).await {
                Ok((admission, how)) => {
                    debug!(room = %claims.room, user = %claims.sub, ?how, "schedule admits");
                    role = admission.role;
                    closes_at = Some(admission.closes_at);
                    self.meeting_title = Some(admission.meeting.title.clone());
                    self.state.meetings.admitted(&claims.room, &admission);
                    let t = |d: chrono::DateTime<Utc>| d.to_rfc3339_opts(SecondsFormat::Secs, true);
                    meeting = Some(MeetingInfo {
                        title: admission.meeting.title.clone(),
                        start: t(admission.meeting.start),
                        end: t(admission.meeting.end),
                        closes_at: t(admission.closes_at),
                    });
                }
                Err(e) => {
                    info!(room = %claims.room, user = %claims.sub, code = e.code(), "schedule refuses: {e}");
                    return self.error(ErrorCode::from_schedule(e.code()), e.to_string());
                }
            }
        }
        let info = ParticipantInfo {
            user_id: claims.sub.clone(),
            name: claims.name.clone(),
            role,
            downlink,
        };
        let Joined {
            participant_id,
            others,
            recording,
            link,
            events,
        } = match self.state.media.join(&claims.room, info).await {
            Ok(j) => j,
            Err(refusal) => return self.error(refusal.code, refusal.message),
        };
        let room = claims.room;
        // Admitted just before the meeting closed, joined just after: the
        // room would otherwise live on outside the schedule.
        if closes_at.is_some_and(|t| Utc::now() >= t) {
            link.leave(crate::meeting::ENDED_BY_SCHEDULE).await;
            return self.error(
                ErrorCode::MeetingEnded,
                "the meeting ended while you were joining",
            );
        }
        info!(%room, participant = %participant_id, user = %claims.sub, "admitted");
        self.send(ServerMessage::Joined {
            participant_id: participant_id.clone(),
            room: room.clone(),
            name: claims.name,
            role,
            participants: others,
            ice_servers: self.state.config.sfu.ice_servers.clone(),
            meeting,
            recording,
        });
        // Someone joining in the last minutes is told right away.
        if let Some(closes_at) = self.state.meetings.closes_at(&room) {
            let warn = chrono::Duration::from_std(self.state.config.schedule.warn_before_close)
                .unwrap_or_default();
            if Utc::now() >= closes_at - warn {
                self.send(ServerMessage::MeetingEnding {
                    closes_at: closes_at.to_rfc3339_opts(SecondsFormat::Secs, true),
                    reason: "the meeting's scheduled time is over".into(),
                });
            }
        }
        self.joined = Some(Me {
            id: participant_id,
            room,
            user_id: claims.sub,
            role,
            link,
        });
        Flow::Joined(events)
    }

    async fn in_room(&mut self, msg: ClientMessage) -> Flow {
        let op = match msg {
            ClientMessage::Offer { sdp } => ToNode::Offer { sdp },
            ClientMessage::Answer { sdp } => ToNode::Answer { sdp },
            ClientMessage::DownlinkAnswer { sdp } => ToNode::DownlinkAnswer { sdp },
            ClientMessage::Candidate { candidate } => ToNode::Candidate { candidate },
            ClientMessage::Mute { kind, muted } => ToNode::Mute { kind, muted },
            ClientMessage::VideoQuality { track_id, quality } => {
                ToNode::VideoQuality { track_id, quality }
            }
            ClientMessage::Leave {} => return Flow::Leave,
            ClientMessage::MuteParticipant {
                participant_id,
                kind,
            } => return self.moderate(Moderation::Mute(participant_id, kind)).await,
            ClientMessage::RemoveParticipant { participant_id } => {
                return self.moderate(Moderation::Remove(participant_id)).await;
            }
            ClientMessage::EndMeeting {} => return self.moderate(Moderation::End).await,
            ClientMessage::StartRecording {} => {
                return self.moderate(Moderation::Record(true)).await;
            }
            ClientMessage::StopRecording {} => {
                return self.moderate(Moderation::Record(false)).await;
            }
            ClientMessage::Join { .. } | ClientMessage::Ping {} => return Flow::Continue,
        };
        let Some(me) = &self.joined else {
            return Flow::Continue;
        };
        if let Err(refused) = me.link.send(op).await {
            debug!(?refused, "client request refused");
            self.send(refused);
        }
        Flow::Continue
    }

    /// Moderator actions. The role was fixed at admission (by the schedule
    /// for meetings), so a participant's client cannot claim it.
    async fn moderate(&self, action: Moderation) -> Flow {
        let Some(me) = &self.joined else {
            return Flow::Continue;
        };
        if me.role != Role::Moderator {
            return self.error(ErrorCode::Forbidden, "only moderators can do that");
        }
        let media = &self.state.media;
        let refused = |e: RoomError| {
            let code = match e {
                RoomError::NoRoom(_) => ErrorCode::RoomClosed,
                RoomError::NoParticipant(_) => ErrorCode::UnknownParticipant,
                RoomError::Unreachable(_) => ErrorCode::Internal,
            };
            self.error(code, e.to_string())
        };
        match action {
            Moderation::Mute(id, kind) => {
                if kind != TrackKind::Audio {
                    return self.error(
                        ErrorCode::BadMessage,
                        "only microphones can be muted by a moderator",
                    );
                }
                info!(room = %me.room, by = %me.id, target = %id, "moderator mute");
                if let Err(e) = media.force_mute(&me.room, &id, &me.id).await {
                    return refused(e);
                }
            }
            Moderation::Remove(id) => {
                if id == me.id {
                    return self.error(ErrorCode::BadMessage, "to leave, send \"leave\"");
                }
                info!(room = %me.room, by = %me.id, target = %id, "moderator removes participant");
                if let Err(e) = media.remove(&me.room, &id, "removed_by_moderator").await {
                    return refused(e);
                }
            }
            Moderation::Record(on) => {
                use crate::recordings::RecordingError as E;
                let title = self
                    .meeting_title
                    .clone()
                    .unwrap_or_else(|| me.room.clone());
                let result = if on {
                    self.state.recordings.start(&me.room, &title, &me.user_id)
                } else {
                    self.state
                        .recordings
                        .stop(&me.room, "stopped by a moderator")
                };
                if let Err(e) = result {
                    let code = match e {
                        E::Disabled => ErrorCode::RecordingDisabled,
                        E::AlreadyRecording => ErrorCode::AlreadyRecording,
                        E::NotRecording => ErrorCode::NotRecording,
                        E::NoRoom => ErrorCode::RoomClosed,
                        E::SpoolFull { .. } => ErrorCode::RecordingSpoolFull,
                        E::NoRecorder => ErrorCode::NoRecorder,
                    };
                    return self.error(code, e.to_string());
                }
            }
            Moderation::End => {
                info!(room = %me.room, by = %me.id, "moderator ends the meeting");
                let media = media.clone();
                let id = me.room.clone();
                // Closing removes this session too; let its socket see that
                // as an ordinary event rather than waiting on itself here.
                tokio::spawn(async move { media.close_room(&id, ENDED_BY_MODERATOR).await });
            }
        }
        Flow::Continue
    }
}
