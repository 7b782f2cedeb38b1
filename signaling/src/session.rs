//! One client's WebSocket: parses what it sends, admits it to a room, and
//! relays the SFU's events back. A bad message costs that client an error
//! message, never the connection of anyone else.

use crate::AppState;
use crate::protocol::{CLIENT_TYPES, ClientMessage, ErrorCode, MAX_MESSAGE_BYTES, ServerMessage};
use axum::extract::ws::{Message, WebSocket};
use confer_sfu::{Joined, Participant, ParticipantInfo, PeerEvent, RoomEvent, SfuError};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
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
                    Some(Outgoing::Json(m)) => Message::Text(serde_json::to_string(&m).unwrap_or_default().into()),
                    Some(Outgoing::Close) | None => {
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
    };
    let mut events: Option<mpsc::UnboundedReceiver<PeerEvent>> = None;
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
            Some(evt) = next_event(&mut events) => {
                if let Some(removed) = session.relay(evt) {
                    session.send(ServerMessage::Removed { reason: removed });
                    session.joined = None; // already out of the room
                    break "removed";
                }
            }
        }
    };
    if let Some((participant, _)) = session.joined.take() {
        participant.leave(reason).await;
    }
    let _ = session.out.send(Outgoing::Close);
    let _ = writer.await;
    debug!(reason, "websocket session ended");
}

async fn next_event(rx: &mut Option<mpsc::UnboundedReceiver<PeerEvent>>) -> Option<PeerEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

enum Outgoing {
    Json(ServerMessage),
    Close,
}

enum Flow {
    Continue,
    Joined(mpsc::UnboundedReceiver<PeerEvent>),
    Leave,
}

struct Session {
    state: AppState,
    out: mpsc::UnboundedSender<Outgoing>,
    joined: Option<(Arc<Participant>, String)>,
}

impl Session {
    fn send(&self, msg: ServerMessage) {
        let _ = self.out.send(Outgoing::Json(msg));
    }

    fn error(&self, code: ErrorCode, message: impl Into<String>) -> Flow {
        let message = message.into();
        debug!(?code, %message, "client error");
        self.send(ServerMessage::error(code, message));
        Flow::Continue
    }

    async fn handle_text(&mut self, text: &str) -> Flow {
        if text.len() > MAX_MESSAGE_BYTES {
            return self.error(
                ErrorCode::MessageTooLarge,
                format!(
                    "message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                    text.len()
                ),
            );
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
            ClientMessage::Join { token, room } => self.join(&token, room).await,
            ClientMessage::Ping {} => {
                self.send(ServerMessage::Pong {});
                Flow::Continue
            }
            msg => {
                let Some((p, _)) = self.joined.clone() else {
                    return self.error(
                        ErrorCode::NotJoined,
                        format!("send \"join\" before {kind:?}"),
                    );
                };
                self.in_room(&p, msg).await
            }
        }
    }

    async fn join(&mut self, token: &str, room: Option<String>) -> Flow {
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
        let info = ParticipantInfo {
            user_id: claims.sub.clone(),
            name: claims.name.clone(),
            role: claims.role,
        };
        let Joined {
            room,
            participant,
            events,
            others,
        } = match self.state.sfu.join(&claims.room, info).await {
            Ok(j) => j,
            Err(e) => {
                let code = match e {
                    SfuError::RoomFull(_) => ErrorCode::RoomFull,
                    SfuError::RoomClosed(_) => ErrorCode::RoomClosed,
                    _ => ErrorCode::Internal,
                };
                return self.error(code, e.to_string());
            }
        };
        info!(room = %room.id, participant = %participant.id, user = %claims.sub, "admitted");
        self.send(ServerMessage::Joined {
            participant_id: participant.id.clone(),
            room: room.id.clone(),
            name: claims.name,
            role: claims.role,
            participants: others,
            ice_servers: self.state.config.sfu.ice_servers.clone(),
        });
        self.joined = Some((participant, room.id.clone()));
        Flow::Joined(events)
    }

    async fn in_room(&mut self, p: &Arc<Participant>, msg: ClientMessage) -> Flow {
        let result = match msg {
            ClientMessage::Offer { sdp } => p.handle_offer(sdp).await,
            ClientMessage::Answer { sdp } => p.handle_answer(sdp).await,
            ClientMessage::Candidate { candidate } => p.add_ice_candidate(candidate).await,
            ClientMessage::Mute { kind, muted } => {
                p.set_muted(kind, muted);
                Ok(())
            }
            ClientMessage::Leave {} => return Flow::Leave,
            ClientMessage::Join { .. } | ClientMessage::Ping {} => Ok(()),
        };
        match result {
            Ok(()) => Flow::Continue,
            Err(SfuError::BadSdp(m)) => self.error(ErrorCode::BadSdp, m),
            Err(SfuError::BadCandidate(m)) => self.error(ErrorCode::BadCandidate, m),
            Err(e) => self.error(ErrorCode::Internal, e.to_string()),
        }
    }

    /// Passes an SFU event to the client. Returns the reason if the
    /// participant was removed.
    fn relay(&self, evt: PeerEvent) -> Option<String> {
        let msg = match evt {
            PeerEvent::Offer(sdp) => ServerMessage::Offer { sdp },
            PeerEvent::Answer(sdp) => ServerMessage::Answer { sdp },
            PeerEvent::IceCandidate(candidate) => ServerMessage::Candidate { candidate },
            PeerEvent::Removed { reason } => return Some(reason),
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
            },
        };
        self.send(msg);
        None
    }
}
