//! HTTP routes: health, readiness, client config, demo login, admin API, and
//! the WebSocket upgrade. Documented in `docs/http-api.md`.

use crate::token::{Claims, now_secs, valid_room_id};
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

/// Hard cap on one WebSocket frame. Messages between this and the protocol's
/// 64 KiB limit get a `message_too_large` error; beyond it the socket closes.
const WS_FRAME_LIMIT: usize = 1024 * 1024;

/// Lifetime of a demo token.
const DEMO_TOKEN_SECS: u64 = 12 * 3600;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/ws", get(ws))
        .route("/api/config", get(client_config))
        .route("/api/demo/token", post(demo_token))
        .route("/api/admin/rooms", get(admin_rooms))
        .route(
            "/api/admin/rooms/{room}",
            get(admin_room).delete(admin_close_room),
        )
        .route(
            "/api/admin/rooms/{room}/participants/{participant}",
            delete(admin_remove_participant),
        )
        .merge(web::routes())
        .with_state(state)
}

async fn ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .max_message_size(WS_FRAME_LIMIT)
        .max_frame_size(WS_FRAME_LIMIT)
        .on_upgrade(move |socket| session::run(socket, state))
}

async fn readyz(State(state): State<AppState>) -> Response {
    // Ready once the SFU exists and the config is loaded: nothing else
    // (no database, no home server) must be up for meetings to work.
    let rooms = state.sfu.rooms().len();
    Json(json!({ "status": "ready", "rooms": rooms })).into_response()
}

async fn client_config(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "demo": state.tokens.can_mint() }))
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
}

/// Demo mode only: anyone may pick a name and a room. The first to join a
/// room does not become moderator; in demo mode everyone is a participant.
async fn demo_token(
    State(state): State<AppState>,
    body: Result<Json<DemoLogin>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !state.tokens.can_mint() {
        return api_error(
            StatusCode::NOT_FOUND,
            "demo_disabled",
            "demo login is off because a token secret or key is configured",
        );
    }
    let Ok(Json(login)) = body else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "expected JSON {\"name\": …, \"room\": …}",
        );
    };
    let name = login.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_name",
            "name must be 1-100 characters",
        );
    }
    if !valid_room_id(&login.room) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "bad_room",
            "room must be 1-64 characters of A-Z a-z 0-9 _ -",
        );
    }
    let claims = Claims {
        sub: format!("demo-{:016x}", rand::random::<u64>()),
        name: name.to_owned(),
        room: login.room,
        role: Role::Participant,
        exp: now_secs() + DEMO_TOKEN_SECS,
        email: None,
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

/// The rejection, if the request lacks the admin secret.
fn check_admin(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(secret) = &state.config.auth.admin_secret else {
        return Some(api_error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "set auth.admin_secret to use the admin API",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
        None
    } else {
        Some(api_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin bearer secret",
        ))
    }
}

async fn admin_rooms(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    Json(json!({ "rooms": state.sfu.rooms() })).into_response()
}

async fn admin_room(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    match state.sfu.room(&room) {
        Some(r) => Json(r.summary()).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            "no_such_room",
            format!("no room {room:?}"),
        ),
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
    if state
        .sfu
        .close_room(&room, "room closed by an administrator")
        .await
    {
        StatusCode::NO_CONTENT.into_response()
    } else {
        api_error(
            StatusCode::NOT_FOUND,
            "no_such_room",
            format!("no room {room:?}"),
        )
    }
}

async fn admin_remove_participant(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((room, participant)): Path<(String, String)>,
) -> Response {
    if let Some(r) = check_admin(&state, &headers) {
        return r;
    }
    let Some(r) = state.sfu.room(&room) else {
        return api_error(
            StatusCode::NOT_FOUND,
            "no_such_room",
            format!("no room {room:?}"),
        );
    };
    if r.participant(&participant).is_none() {
        return api_error(
            StatusCode::NOT_FOUND,
            "no_such_participant",
            format!("no participant {participant:?} in {room:?}"),
        );
    }
    r.leave(&participant, "removed by an administrator").await;
    StatusCode::NO_CONTENT.into_response()
}
