//! Confer's front door: HTTP and WebSocket on axum.
//!
//! - [`config`]: the configuration file and its validation.
//! - [`token`]: join tokens (JWT) and demo-mode minting.
//! - [`protocol`]: the WebSocket messages (`docs/signaling.md`).
//! - [`session`]: one client's WebSocket, relayed to and from the SFU.
//! - [`media`]: where rooms live: this process's SFU, or SFU nodes
//!   elsewhere ([`nodes`] reaches them; [`sfu_node`] is what they run).
//! - [`schedule`]: is this meeting on now, and is this person invited
//!   (local file, CalDAV or HTTP home server, behind a cache).
//! - [`meeting`]: closing rooms at the end of their scheduled time, and
//!   room lifecycle as [`webhook`]s to the home server.
//! - [`recordings`]: starting and stopping recordings, listing and
//!   download links.
//! - [`http`]: health, the admin API and the demo login (`docs/http-api.md`).
//! - [`web`]: the browser client, embedded in the binary.
//!
//! [`serve`] runs everything on one listener; `confer serve` calls it.

pub mod config;
/// For tests here and in `tests/`: the examples in `docs/`.
#[doc(hidden)]
pub mod doc_examples;
pub mod http;
pub mod media;
pub mod meeting;
pub mod nodes;
pub mod protocol;
pub mod recorders;
pub mod recordings;
pub mod schedule;
pub mod session;
pub mod sfu_node;
pub mod token;
pub mod web;
pub mod webhook;

use confer_sfu::Sfu;
use config::SourceKind;
use media::Media;
use schedule::local::LocalSource;
use schedule::{Policy, Rules, Schedule};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub use config::Config;

/// What every request handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    /// Where the rooms are.
    pub media: Media,
    pub tokens: Arc<token::Tokens>,
    /// `None` when `schedule.source = "none"`: tokens alone admit.
    pub schedule: Option<Arc<Schedule>>,
    /// The local schedule, where the demo page creates meetings.
    pub local_meetings: Option<Arc<LocalSource>>,
    pub meetings: Arc<meeting::Meetings>,
    pub recordings: Arc<recordings::Recordings>,
}

impl AppState {
    /// Builds the services from a validated config, with the rooms in this
    /// process (`confer serve`).
    pub fn new(config: Config) -> Result<AppState, String> {
        let sfu = Sfu::new(config.sfu.clone()).map_err(|e| e.to_string())?;
        AppState::with_media(config, Media::Local(sfu))
    }

    /// As [`AppState::new`], with the rooms on `media`.
    pub fn with_media(config: Config, media: Media) -> Result<AppState, String> {
        let tokens = if config.demo_mode() {
            token::Tokens::demo()
        } else {
            let pem = match &config.auth.token_public_key_file {
                Some(p) => Some(
                    std::fs::read(p)
                        .map_err(|e| format!("auth.token_public_key_file: {}: {e}", p.display()))?,
                ),
                None => None,
            };
            token::Tokens::new(config.auth.token_secret.as_deref(), pem.as_deref())
                .map_err(|e| format!("auth.token_public_key_file: {e}"))?
        };
        let tokens = Arc::new(tokens);
        let client = reqwest::Client::builder()
            .timeout(config.schedule.timeout)
            .connect_timeout(config.schedule.timeout)
            .user_agent(concat!("confer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let (schedule, local_meetings) = build_schedule(&config, client.clone());
        let webhooks = config.webhooks.url.as_ref().map(|url| {
            let hook_client = reqwest::Client::builder()
                .timeout(config.webhooks.timeout)
                .user_agent(concat!("confer/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("a client with a time-out builds");
            webhook::Webhooks::new(
                hook_client,
                url.clone(),
                config.webhooks.secret.as_deref().unwrap_or_default(),
                config.webhooks.give_up_after,
            )
        });
        let recordings =
            recordings::Recordings::new(&config, media.clone(), webhooks.clone(), tokens.clone());
        let meetings = meeting::Meetings::new(
            media.clone(),
            schedule.clone(),
            webhooks,
            config.schedule.warn_before_close,
        );
        Ok(AppState {
            media,
            config: Arc::new(config),
            tokens,
            schedule,
            local_meetings,
            meetings,
            recordings,
        })
    }
}

fn build_schedule(
    config: &Config,
    client: reqwest::Client,
) -> (Option<Arc<Schedule>>, Option<Arc<LocalSource>>) {
    let s = &config.schedule;
    let floating = s.timezone.parse().unwrap_or(chrono_tz::UTC); // validated
    let mut local = None;
    let source: Arc<dyn schedule::Source> = match s.source {
        SourceKind::None => return (None, None),
        SourceKind::Local => {
            let path = s
                .local
                .file
                .clone()
                .unwrap_or_else(|| config.data_dir.join("meetings.json"));
            let l = Arc::new(LocalSource::new(path));
            local = Some(l.clone());
            l
        }
        SourceKind::Caldav => {
            let credentials = s
                .caldav
                .username
                .clone()
                .map(|u| (u, s.caldav.password.clone().unwrap_or_default()));
            Arc::new(schedule::caldav::CaldavSource::new(
                client,
                s.caldav.calendars.clone(),
                credentials,
                floating,
            ))
        }
        SourceKind::Http => {
            let auth = s.http.auth_header.clone().zip(s.http.auth_value.clone());
            Arc::new(schedule::http::HttpSource::new(
                client,
                s.http.url.clone().unwrap_or_default(),
                auth,
            ))
        }
    };
    let to_chrono = |d: Duration| chrono::Duration::from_std(d).unwrap_or_default();
    let rules = Rules {
        early_join: to_chrono(s.early_join),
        grace: to_chrono(s.grace),
    };
    let policy = Policy {
        ttl: s.cache_ttl,
        stale_for: (s.when_unreachable == config::Unreachable::UseCache).then_some(s.stale_limit),
        retries: s.retries,
        backoff: Duration::from_millis(250),
    };
    (Some(Arc::new(Schedule::new(source, rules, policy))), local)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::spawn(
        state
            .meetings
            .clone()
            .follow(state.media.observe(), state.recordings.clone()),
    );
    tokio::spawn(
        state
            .recordings
            .clone()
            .maintain(state.config.recording.sweep_interval),
    );
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
