//! `confer sfu`: an SFU node of a split deployment. It holds rooms and
//! media; `confer signaling` admits participants and drives it over the
//! HTTP and WebSocket API here (`docs/sfu-nodes.md`), with a shared bearer
//! secret. It never sees a token, a schedule or a browser's socket.

use crate::media::{self, Announcement, JoinAnswer, RoomError, ToNode};
use crate::protocol::{ErrorCode, ServerMessage};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use confer_sfu::{ParticipantInfo, Sfu};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tracing::{debug, info, warn};

/// Signaling answers our pings; a socket silent this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(12);
pub const PING_EVERY: Duration = Duration::from_secs(4);

/// The first message on the events socket: the rooms open now, so that a
/// signaling service that (re)connects knows where they are.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub rooms: Vec<RoomLoad>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoomLoad {
    pub id: String,
    pub participants: usize,
}

#[derive(Clone)]
struct Node {
    sfu: Arc<Sfu>,
    secret: Arc<str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct By {
    by: String,
}

/// The node's API. `secret` is `split.secret`, shared with signaling.
pub fn router(sfu: Arc<Sfu>, secret: &str) -> Router {
    let node = Node {
        sfu,
        secret: secret.into(),
    };
    let api = Router::new()
        .route("/session", get(session))
        .route("/events", get(events))
        .route("/rooms", get(rooms))
        .route("/media", get(media))
        .route("/rooms/{room}", get(room))
        .route("/rooms/{room}/close", post(close))
        .route("/rooms/{room}/announce", post(announce))
        .route("/rooms/{room}/participants/{id}/remove", post(remove))
        .route("/rooms/{room}/participants/{id}/mute", post(mute))
        .route_layer(axum::middleware::from_fn_with_state(
            node.clone(),
            authorise,
        ));
    Router::new()
        .nest("/sfu/v1", api)
        .route("/healthz", get(|| async { "ok" }))
        .with_state(node)
}

async fn authorise(
    State(node): State<Node>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(node.secret.as_bytes())) {
        next.run(request).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong split.secret bearer token",
        )
    }
}

/// A JSON body; a bad one is refused in the API's error form.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(error(StatusCode::BAD_REQUEST, "bad_request", e.body_text())),
        }
    }
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({ "error": { "code": code, "message": message.into() } });
    (status, Json(body)).into_response()
}

fn no_room(room: &str) -> Response {
    not_found(RoomError::NoRoom(room.to_owned()))
}

async fn rooms(State(node): State<Node>) -> Response {
    Json(json!({ "rooms": node.sfu.rooms() })).into_response()
}

async fn media(State(node): State<Node>) -> Response {
    Json(json!({ "media_socket": node.sfu.media_socket() })).into_response()
}

async fn room(State(node): State<Node>, Path(room): Path<String>) -> Response {
    match node.sfu.room(&room) {
        Some(r) => Json(r.summary()).into_response(),
        None => no_room(&room),
    }
}

async fn close(
    State(node): State<Node>,
    Path(room): Path<String>,
    Body(Reason { reason }): Body<Reason>,
) -> Response {
    match node.sfu.close_room(&room, &reason).await {
        true => StatusCode::NO_CONTENT.into_response(),
        false => no_room(&room),
    }
}

async fn announce(
    State(node): State<Node>,
    Path(room): Path<String>,
    Body(what): Body<Announcement>,
) -> Response {
    match node.sfu.room(&room) {
        Some(r) => {
            media::announce_local(&r, what);
            StatusCode::NO_CONTENT.into_response()
        }
        None => no_room(&room),
    }
}

async fn remove(
    State(node): State<Node>,
    Path((room, id)): Path<(String, String)>,
    Body(Reason { reason }): Body<Reason>,
) -> Response {
    match media::find_local(&node.sfu, &room, &id) {
        Ok((r, _)) => {
            r.leave(&id, &reason).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => not_found(e),
    }
}

async fn mute(
    State(node): State<Node>,
    Path((room, id)): Path<(String, String)>,
    Body(By { by }): Body<By>,
) -> Response {
    match media::find_local(&node.sfu, &room, &id) {
        Ok((_, p)) => {
            p.force_mute(&by);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => not_found(e),
    }
}

fn not_found(e: RoomError) -> Response {
    let code = match e {
        RoomError::NoParticipant(_) => "no_such_participant",
        _ => "no_such_room",
    };
    error(StatusCode::NOT_FOUND, code, e.to_string())
}

/// Room lifecycle for signaling: a [`Snapshot`], then every
/// [`confer_sfu::Lifecycle`] event. One signaling service at a time.
async fn events(State(node): State<Node>, upgrade: WebSocketUpgrade) -> Response {
    crate::http::sized(upgrade).on_upgrade(move |socket| async move {
        // Observe first, so nothing falls between the snapshot and the events.
        let mut lifecycle = node.sfu.observe();
        let snapshot = Snapshot {
            rooms: node
                .sfu
                .rooms()
                .into_iter()
                .map(|r| RoomLoad {
                    id: r.id,
                    participants: r.participants.len(),
                })
                .collect(),
        };
        let (mut sink, mut stream) = socket.split();
        let text = |v: String| Message::Text(v.into());
        let first = serde_json::to_string(&snapshot).expect("serialises");
        if sink.send(text(first)).await.is_err() {
            return;
        }
        info!("signaling connected for room events");
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                e = lifecycle.recv() => {
                    let Some(e) = e else { return };
                    let line = serde_json::to_string(&e).expect("serialises");
                    if sink.send(text(line)).await.is_err() {
                        break;
                    }
                }
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break;
                    }
                }
                incoming = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => match incoming {
                    Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => break,
                    Ok(Some(Ok(_))) => {}
                },
            }
        }
        info!("signaling's room events socket closed");
    })
}

/// One participant's session: a [`ToNode::Join`], then requests one way
/// and [`ServerMessage`]s the other. The socket closing removes the
/// participant.
async fn session(State(node): State<Node>, upgrade: WebSocketUpgrade) -> Response {
    crate::http::sized(upgrade).on_upgrade(move |socket| run_session(node.sfu, socket))
}

async fn run_session(sfu: Arc<Sfu>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let text = |v: String| Message::Text(v.into());
    let info = match tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ToNode>(t.as_str()) {
            Ok(ToNode::Join {
                room,
                user_id,
                name,
                role,
                downlink,
            }) => (
                room,
                ParticipantInfo {
                    user_id,
                    name,
                    role,
                    downlink,
                },
            ),
            Ok(other) => {
                warn!(?other, "session socket must start with join");
                return;
            }
            Err(e) => {
                warn!("bad join on a session socket: {e}");
                return;
            }
        },
        _ => return,
    };
    let (room, info) = info;
    let joined = media::join_local(&sfu, &room, info).await;
    let answer = match &joined {
        Ok(j) => JoinAnswer::Joined {
            participant_id: j.participant_id.clone(),
            participants: j.others.clone(),
            recording: j.recording.clone(),
        },
        Err(r) => JoinAnswer::Refused {
            code: r.code,
            message: r.message.clone(),
        },
    };
    let first = serde_json::to_string(&answer).expect("serialises");
    let sent = sink.send(text(first)).await.is_ok();
    let Ok(mut joined) = joined else { return };
    let media::Link::Local(participant) = joined.link else {
        unreachable!("a local join links locally")
    };
    if !sent {
        participant.leave("disconnected").await;
        return;
    }
    let send = |m: &ServerMessage| text(serde_json::to_string(m).expect("serialises"));
    let mut ping = tokio::time::interval(PING_EVERY);
    let reason = loop {
        tokio::select! {
            incoming = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => match incoming {
                Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ToNode>(t.as_str()) {
                    Ok(ToNode::Leave { reason }) => break reason,
                    Ok(op) => {
                        if let Err(refused) = media::apply(&participant, op).await
                            && sink.send(send(&refused)).await.is_err()
                        {
                            break "disconnected".into();
                        }
                    }
                    Err(e) => {
                        // Signaling sends only what it parsed: a bug, not a client.
                        warn!("bad request on a session socket: {e}");
                        let m = ServerMessage::error(ErrorCode::Internal, format!("SFU node: {e}"));
                        let _ = sink.send(send(&m)).await;
                    }
                },
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break "disconnected".into(),
                Err(_) => break "connection lost".into(),
                Ok(Some(Ok(_))) => {}
            },
            evt = joined.events.recv() => {
                let Some(msg) = evt else { break "disconnected".into() };
                let removed = matches!(msg, ServerMessage::Removed { .. });
                if sink.send(send(&msg)).await.is_err() && !removed {
                    break "disconnected".into();
                }
                if removed {
                    let _ = sink.send(Message::Close(None)).await;
                    debug!(participant = %participant.id, "removed");
                    return;
                }
            }
            _ = ping.tick() => {
                let _ = sink.send(Message::Ping(Default::default())).await;
            }
        }
    };
    participant.leave(&reason).await;
    let _ = sink.send(Message::Close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc_examples::marked;
    use confer_sfu::Lifecycle;

    fn lines<T: serde::de::DeserializeOwned>(name: &str) -> Vec<T> {
        marked("sfu-nodes.md", name)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {l}: {e}")))
            .collect()
    }

    /// What docs/sfu-nodes.md shows is what the node and signaling exchange.
    #[test]
    fn documented_node_messages_are_the_real_ones() {
        let snapshot: Snapshot =
            serde_json::from_str(&marked("sfu-nodes.md", "node-snapshot")).unwrap();
        assert_eq!(snapshot.rooms[0].participants, 3);
        let events: Vec<Lifecycle> = lines("node-events");
        assert!(matches!(events[0], Lifecycle::RoomOpened { .. }));
        assert!(matches!(events[1], Lifecycle::Joined { .. }));
        assert!(matches!(events[2], Lifecycle::Left { .. }));
        assert!(matches!(events[3], Lifecycle::RoomClosed { .. }));
        let join: Vec<ToNode> = lines("node-join");
        assert!(matches!(join[0], ToNode::Join { .. }));
        let answers: Vec<JoinAnswer> = lines("node-join-answers");
        assert!(matches!(answers[0], JoinAnswer::Joined { .. }));
        assert!(matches!(
            answers[1],
            JoinAnswer::Refused {
                code: ErrorCode::RoomFull,
                ..
            }
        ));
        let requests: Vec<ToNode> = lines("node-requests");
        assert_eq!(requests.len(), 6);
        assert!(matches!(requests[5], ToNode::Leave { .. }));
        let announcements: Vec<Announcement> = lines("node-announcements");
        assert_eq!(announcements.len(), 2);
        // And the real messages serialise to the documented shapes.
        let ours = serde_json::to_value(&announcements[1]).unwrap();
        let documented: serde_json::Value = serde_json::from_str(
            marked("sfu-nodes.md", "node-announcements")
                .lines()
                .nth(1)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ours, documented);
    }
}
