//! Confer's front door: HTTP and WebSocket on axum.
//!
//! - [`config`]: the configuration file and its validation.
//! - [`token`]: join tokens (JWT) and demo-mode minting.
//! - [`protocol`]: the WebSocket messages (`docs/signaling.md`).
//! - [`session`]: one client's WebSocket, relayed to and from the SFU.
//! - [`http`]: health, the admin API and the demo login (`docs/http-api.md`).
//! - [`web`]: the browser client, embedded in the binary.
//!
//! [`serve`] runs everything on one listener; `confer serve` calls it.

pub mod config;
pub mod http;
pub mod protocol;
pub mod session;
pub mod token;
pub mod web;

use confer_sfu::Sfu;
use std::sync::Arc;
use tokio::net::TcpListener;

pub use config::Config;

/// What every request handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub sfu: Arc<Sfu>,
    pub tokens: Arc<token::Tokens>,
}

impl AppState {
    /// Builds the services from a validated config.
    pub fn new(config: Config) -> Result<AppState, String> {
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
        Ok(AppState {
            sfu: Sfu::new(config.sfu.clone()),
            config: Arc::new(config),
            tokens: Arc::new(tokens),
        })
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
