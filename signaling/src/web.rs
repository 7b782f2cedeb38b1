//! The browser client, compiled into the binary so one file runs Confer.

use crate::AppState;
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;

const INDEX: &str = include_str!("../../web/index.html");
const MEETING: &str = include_str!("../../web/meeting.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");
const RECORDINGS: &str = include_str!("../../web/recordings.html");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        // One page for both layouts: the script reads the path.
        .route("/m/{room}", get(|| async { Html(MEETING) }))
        .route("/call/{room}", get(|| async { Html(MEETING) }))
        .route("/r/{room}", get(|| async { Html(RECORDINGS) }))
        .route(
            "/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    APP_JS,
                )
                    .into_response()
            }),
        )
        .route(
            "/style.css",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
            }),
        )
}
