//! HTTP routes: health, readiness, client config, demo login, admin API, and
//! the WebSocket upgrade. Documented in `docs/http-api.md`.

use crate::media::{Media, RoomError};
use crate::schedule::Meeting;
use crate::schedule::local::LocalMeeting;
use crate::token::{Claims, JoinKind, now_secs, valid_room_id};
use crate::{AppState, session, web};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use confer_sfu::Role;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

/// Hard cap on one WebSocket frame. Messages between the protocol's limits
/// (64 KiB; offers and answers 1000 KiB) and this get a `message_too_large`
/// error; beyond it the socket closes.
const WS_FRAME_LIMIT: usize = 1024 * 1024;

/// Lifetime of a demo token.
const DEMO_TOKEN_SECS: u64 = 12 * 3600;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/ws", get(ws))
        .route("/api/recorders", get(recorders))
        .route("/api/config", get(client_config))
        .route("/api/demo/token", post(demo_token))
        .route("/api/demo/meetings", post(demo_meeting))
        .route("/api/rooms/{room}/recordings", get(list_recordings))
        .route(
            "/api/rooms/{room}/recordings/{id}/file",
            get(recording_file),
        )
        .route("/api/admin/rooms", get(admin_rooms))
        .route(
            "/api/admin/rooms/{room}",
            get(admin_room).delete(admin_close_room),
        )
        .route(
            "/api/admin/rooms/{room}/participants/{participant}",
            delete(admin_remove_participant),
        )
        .route("/api/admin/recorders", get(admin_recorders))
        .route("/api/admin/sfu-nodes", get(admin_sfu_nodes))
        .merge(web::routes())
        .with_state(state)
}

/// Our WebSockets carry small JSON messages (SDP at most 1 MB), one at a
/// time: axum's default 128 KiB read buffer per socket was a tenth of the
/// memory a participant costs (heaptrack, loadtest meeting-10).
pub(crate) fn sized(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade
        .max_message_size(WS_FRAME_LIMIT)
        .max_frame_size(WS_FRAME_LIMIT)
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
}

async fn ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    sized(upgrade).on_upgrade(move |socket| session::run(socket, state))
}

/// A recorder process connecting (`docs/recording.md`).
async fn recorders(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(remote) = state.recordings.remote.clone() else {
        return api_error(
            StatusCode::FORBIDDEN,
            "recorders_disabled",
            "set recording.recorders = \"remote\" for recorder processes to connect",
        );
    };
    let secret = state.config.recording.recorder_secret.as_deref();
    if let Some(refused) = check_bearer(&headers, secret, "recorder") {
        return refused;
    }
    sized(upgrade).on_upgrade(move |socket| remote.serve(socket))
}

async fn readyz(State(state): State<AppState>) -> Response {
    // Ready once the SFU exists and the config is loaded: nothing else
    // (no database, no home server) must be up for meetings to work.
    let rooms = state.media.room_count();
    if let Media::Remote(nodes) = &state.media
        && !nodes.any_up()
    {
        // Split deployments: no node, no meetings.
        let body = json!({ "status": "no SFU node reachable", "rooms": rooms });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(json!({ "status": "ready", "rooms": rooms })).into_response()
}

async fn client_config(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "demo": state.tokens.can_mint(),
        "local_meetings": state.local_meetings.is_some(),
    }))
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message.into() } })),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoLogin {
    name: String,
    room: String,
    /// `meeting` (default) or `call`.
    #[serde(default)]
    kind: JoinKind,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DemoMeeting {
    /// The organizer's display name.
    name: String,
    #[serde(default)]
    title: Option<String>,
    /// Length from now; default 60.
    #[serde(default)]
    minutes: Option<u32>,
}

/// Demo mode only: anyone may pick a name and a room. The first to join a
/// room does not become moderator; in demo mode everyone is a participant.
async fn demo_token(
    State(state): State<AppState>,
    body: Result<Json<DemoLogin>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Some(r) = demo_disabled(&state) {
        return r;
    }
    let Ok(Json(login)) = body else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected JSON {\"name\": …, \"room\": …, \"kind\": \"meeting\" | \"call\"}",
        );
    };
    let name = match demo_name(&login.name) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    if !valid_room_id(&login.room) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_room",
            "room must be 1-64 characters of A-Z a-z 0-9 _ -",
        );
    }
    demo_mint(&state, name, login.room, login.kind)
}

/// Demo mode: schedules a meeting from now in the local schedule, open to
/// anyone with the link, and returns the organizer's (moderator's) token.
async fn demo_meeting(
    State(state): State<AppState>,
    body: Result<Json<DemoMeeting>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Some(r) = demo_disabled(&state) {
        return r;
    }
    let Some(local) = state.local_meetings.clone() else {
        return api_error(
            StatusCode::NOT_FOUND,
            "no_local_schedule",
            "meetings come from the home server (schedule.source is not \"local\")",
        );
    };
    let Ok(Json(req)) = body else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected JSON {\"name\": …, \"title\": …, \"minutes\": …}",
        );
    };
    let name = match demo_name(&req.name) {
        Ok(n) => n,
        Err(r) => return *r,
    };
    let minutes = req.minutes.unwrap_or(60);
    if !(1..=24 * 60).contains(&minutes) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_minutes",
            "minutes must be 1 to 1440",
        );
    }
    let title = req.title.unwrap_or_else(|| format!("{name}'s meeting"));
    if title.chars().count() > 200 {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_title",
            "title must be at most 200 characters",
        );
    }
    let room = format!("{:016x}", rand::random::<u64>());
    let sub = demo_user();
    let now = chrono::Utc::now();
    let meeting = LocalMeeting {
        room: room.clone(),
        meeting: Meeting {
            title,
            start: now,
            end: now + chrono::Duration::minutes(minutes.into()),
            status: Default::default(),
            organizer: Some(sub.clone()),
            invitees: vec![],
            open: true,
        },
    };
    if let Err(e) = local.add(meeting).await {
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    }
    let claims = Claims {
        sub,
        name: name.to_owned(),
        room: room.clone(),
        role: Role::Moderator,
        exp: now_secs() + DEMO_TOKEN_SECS,
        email: None,
        kind: JoinKind::Meeting,
    };
    match state.tokens.mint(&claims) {
        Some(token) => (
            StatusCode::CREATED,
            Json(json!({ "room": room, "token": token, "url": format!("/m/{room}") })),
        )
            .into_response(),
        None => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "token could not be signed",
        ),
    }
}

fn demo_disabled(state: &AppState) -> Option<Response> {
    (!state.tokens.can_mint()).then(|| {
        api_error(
            StatusCode::NOT_FOUND,
            "demo_disabled",
            "demo login is off because a token secret or key is configured",
        )
    })
}

fn demo_name(raw: &str) -> Result<&str, Box<Response>> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Box::new(api_error(
            StatusCode::BAD_REQUEST,
            "bad_name",
            "name must be 1-100 characters",
        )));
    }
    Ok(name)
}

fn demo_user() -> String {
    format!("demo-{:016x}", rand::random::<u64>())
}

fn demo_mint(state: &AppState, name: &str, room: String, kind: JoinKind) -> Response {
    let claims = Claims {
        sub: demo_user(),
        name: name.to_owned(),
        room,
        role: Role::Participant,
        exp: now_secs() + DEMO_TOKEN_SECS,
        email: None,
        kind,
    };
    match state.tokens.mint(&claims) {
        Some(token) => Json(json!({ "token": token, "expires_at": claims.exp })).into_response(),
        None => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "token could not be signed",
        ),
    }
}

/// Who may see a room's recordings: the holder of a valid join token for
/// that room (the home server issues those only to people allowed in).
fn check_room_token(state: &AppState, headers: &HeaderMap, room: &str) -> Option<Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return Some(api_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send a join token for this room as Authorization: Bearer <token>",
        ));
    };
    match state.tokens.verify(token) {
        Ok(c) if c.room == room => None,
        Ok(_) => Some(api_error(
            StatusCode::FORBIDDEN,
            "wrong_room",
            "the token is for another room",
        )),
        Err(e) => Some(api_error(StatusCode::UNAUTHORIZED, e.code(), e.to_string())),
    }
}

async fn list_recordings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    if let Some(r) = check_room_token(&state, &headers, &room) {
        return r;
    }
    match state.recordings.list(&room).await {
        Ok(list) => {
            let items: Vec<_> = list
                .into_iter()
                .map(|m| {
                    json!({
                        "id": m.id,
                        "title": m.title,
                        "started_at": m.started_at,
                        "ended_at": m.ended_at,
                        "duration_ms": m.duration_ms,
                        "size": m.size,
                        "expires_at": m.expires_at,
                        "participants": m.participants,
                        "content_type": m.content_type,
                        "download_url": state.recordings.link(&room, &m.id),
                    })
                })
                .collect();
            Json(json!({
                "recording": state.recordings.is_recording(&room),
                "recordings": items,
            }))
            .into_response()
        }
        Err(e) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
struct Link {
    expires: i64,
    sig: String,
}

/// A recording's bytes, through a link from the list (signed, minutes
/// long), with HTTP Range support so players can seek.
async fn recording_file(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    link: Result<axum::extract::Query<Link>, axum::extract::rejection::QueryRejection>,
    request: axum::extract::Request,
) -> Response {
    let Ok(axum::extract::Query(link)) = link else {
        return api_error(StatusCode::FORBIDDEN, "bad_link", "the link is incomplete");
    };
    if !state
        .recordings
        .link_valid(&room, &id, link.expires, &link.sig)
    {
        return api_error(
            StatusCode::FORBIDDEN,
            "bad_link",
            "the link has expired or is not valid; reload the recordings list",
        );
    }
    match state.recordings.download(&room, &id).await {
        Ok(Some((_, confer_recorder::store::Download::File(path)))) => {
            let mime: mime::Mime = "video/webm".parse().expect("valid");
            match tower_http::services::ServeFile::new_with_mime(path, &mime)
                .try_call(request)
                .await
            {
                Ok(r) => r.map(axum::body::Body::new),
                Err(e) => api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    e.to_string(),
                ),
            }
        }
        Ok(Some((_, confer_recorder::store::Download::Url(url)))) => {
            (StatusCode::FOUND, [(header::LOCATION, url)]).into_response()
        }
        Ok(None) => api_error(
            StatusCode::NOT_FOUND,
            "no_such_recording",
            "no such recording (it may have expired)",
        ),
        Err(e) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            e.to_string(),
        ),
    }
}

fn check_admin(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(secret) = &state.config.auth.admin_secret else {
        return Some(api_error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "set auth.admin_secret to use the admin API",
        ));
    };
    check_bearer(headers, Some(secret), "admin")
}

/// `None` when the request carries `secret` as its bearer token.
fn check_bearer(headers: &HeaderMap, secret: Option<&str>, what: &str) -> Option<Response> {
    let secret = secret.unwrap_or_default();
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !secret.is_empty() && bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
        None
    } else {
        Some(api_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("missing or wrong {what} bearer secret"),
        ))
    }
}

async fn admin_rooms(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    match state.media.rooms().await {
        Ok(rooms) => Json(json!({ "rooms": rooms })).into_response(),
        Err(e) => room_error(e),
    }
}

async fn admin_recorders(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    let (mode, recorders) = match &state.recordings.remote {
        Some(remote) => ("remote", remote.status()),
        None => ("embedded", Vec::new()),
    };
    Json(json!({ "mode": mode, "recorders": recorders })).into_response()
}

async fn admin_sfu_nodes(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    match &state.media {
        Media::Local(sfu) => Json(json!({
            "mode": "embedded",
            "nodes": [],
            "media_socket": sfu.media_socket(),
        })),
        Media::Remote(nodes) => Json(json!({ "mode": "split", "nodes": nodes.status().await })),
    }
    .into_response()
}

async fn admin_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    match state.media.room(&room).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => room_error(e),
    }
}

async fn admin_close_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    match state
        .media
        .close_room(&room, "room closed by an administrator")
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => room_error(e),
    }
}

/// An admin request on a room that failed, as an HTTP answer.
fn room_error(e: RoomError) -> Response {
    let (status, code) = match e {
        RoomError::NoRoom(_) => (StatusCode::NOT_FOUND, "no_such_room"),
        RoomError::NoParticipant(_) => (StatusCode::NOT_FOUND, "no_such_participant"),
        RoomError::Unreachable(_) => (StatusCode::BAD_GATEWAY, "sfu_unreachable"),
    };
    api_error(status, code, e.to_string())
}

async fn admin_remove_participant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room, participant)): Path<(String, String)>,
) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    match state
        .media
        .remove(&room, &participant, "removed by an administrator")
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => room_error(e),
    }
}
