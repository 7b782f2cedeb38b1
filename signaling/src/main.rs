//! `confer`: runs Confer's services.

use anyhow::Context;
use clap::{Parser, Subcommand};
use confer_signaling::{AppState, Config};
use std::net::SocketAddr;
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "confer", version, about = "Self-hosted WebRTC conferencing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// Configuration file (TOML); see deploy/confer.toml.
    #[arg(long, env = "CONFER_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP/WebSocket address (overrides `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in this process (the default install).
    Serve(Common),
    /// Run an SFU node of a split deployment: rooms and media, driven by
    /// `confer signaling` (see docs/sfu-nodes.md).
    Sfu(Common),
    /// Run signaling, the web client and the APIs, with the rooms on the
    /// SFU nodes listed in `split.sfu_nodes`.
    Signaling(Common),
    /// Record meetings for a signaling server elsewhere
    /// (`recording.recorders = "remote"` there; see docs/recording.md).
    Recorder(Common),
    /// Load and validate the configuration for a role, print it, and exit.
    CheckConfig {
        #[command(flatten)]
        common: Common,
        /// The role to check it for: each validates the keys it uses.
        #[arg(long, value_enum, default_value = "serve")]
        role: Role,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Role {
    Serve,
    Signaling,
    Sfu,
    Recorder,
}

/// The configuration as `role` validates it.
fn load(c: &Common, role: Role) -> anyhow::Result<Config> {
    let (path, env) = (c.config.as_deref(), std::env::vars());
    let cfg = match role {
        Role::Serve => Config::load(path, env)?,
        Role::Signaling => Config::load_signaling(path, env)?,
        Role::Sfu => Config::load_sfu_node(path, env)?,
        Role::Recorder => Config::load_recorder(path, env)?,
    };
    finish(c, cfg)
}

/// Command-line flags over the file and environment.
fn finish(c: &Common, mut cfg: Config) -> anyhow::Result<Config> {
    if let Some(l) = c.listen {
        cfg.listen = l;
    }
    if let Some(d) = &c.data_dir {
        cfg.data_dir = d.clone();
    }
    Ok(cfg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("CONFER_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,webrtc=warn,rtc=error")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(c) => {
            let cfg = load(&c, Role::Serve)?;
            let state = AppState::new(cfg.clone()).map_err(anyhow::Error::msg)?;
            serve(cfg, state).await
        }
        Command::Signaling(c) => {
            let cfg = load(&c, Role::Signaling)?;
            let split = &cfg.split;
            let nodes = confer_signaling::nodes::Nodes::connect(
                split.sfu_nodes.clone(),
                split.secret.clone().unwrap_or_default(),
            );
            let media = confer_signaling::media::Media::Remote(nodes);
            let state = AppState::with_media(cfg.clone(), media).map_err(anyhow::Error::msg)?;
            serve(cfg, state).await
        }
        Command::Sfu(c) => sfu_node(load(&c, Role::Sfu)?).await,
        Command::Recorder(c) => recorder(load(&c, Role::Recorder)?).await,
        Command::CheckConfig { common, role } => {
            let cfg = load(&common, role)?;
            println!(
                "configuration is valid: listen {}, data_dir {}, demo mode {}",
                cfg.listen,
                cfg.data_dir.display(),
                cfg.demo_mode()
            );
            Ok(())
        }
    }
}

async fn serve(cfg: Config, state: AppState) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", cfg.data_dir.display()))?;
    let listen = cfg.listen;
    let demo = cfg.demo_mode();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen: cannot bind {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, demo, "Confer is serving on http://{addr}/");
    // Scripts read this line to find the port when they asked for port 0.
    println!("confer listening on http://{addr}/");
    let recordings = state.recordings.clone();
    tokio::select! {
        served = confer_signaling::serve(listener, state, std::future::pending()) => served?,
        () = stop_requested() => {
            // Participants' clients reconnect when the socket drops; a
            // recording is stored now rather than recovered at next start.
            tracing::info!("shutting down: storing recordings in progress");
            let finishing = recordings.finish_all("the server is shutting down");
            match tokio::time::timeout(SHUTDOWN_GRACE, finishing).await {
                Ok(n) => tracing::info!(recordings = n, "stopped"),
                Err(_) => tracing::warn!(
                    "recordings were still being stored after {SHUTDOWN_GRACE:?}; the next start finishes them"
                ),
            }
        }
    }
    Ok(())
}

async fn sfu_node(cfg: Config) -> anyhow::Result<()> {
    let listen = cfg.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen: cannot bind {listen}"))?;
    let addr = listener.local_addr()?;
    let sfu = confer_sfu::Sfu::new(cfg.sfu.clone())?;
    let secret = cfg.split.secret.clone().unwrap_or_default();
    tracing::info!(%addr, ice_ip = %cfg.sfu.ice_ip, "SFU node serving signaling on http://{addr}/");
    println!("confer sfu listening on http://{addr}/");
    let app = confer_signaling::sfu_node::router(sfu.clone(), &secret);
    tokio::select! {
        served = axum::serve(listener, app) => served?,
        // Exiting drops every session socket: signaling closes those
        // participants' WebSockets, and their clients reconnect into rooms
        // opened again on the other nodes.
        () = stop_requested() => tracing::info!(rooms = sfu.rooms().len(), "shutting down"),
    }
    Ok(())
}

async fn recorder(cfg: Config) -> anyhow::Result<()> {
    let (store, _) = confer_signaling::recordings::open_store(&cfg);
    let settings = confer_signaling::recordings::recorder_settings(&cfg);
    std::fs::create_dir_all(&settings.spool).with_context(|| {
        format!(
            "recording.spool_dir: cannot create {}",
            settings.spool.display()
        )
    })?;
    let r = &cfg.recorder;
    let name = r.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "recorder".into())
    });
    let worker = confer_recorder::worker::WorkerSettings {
        signaling: r.signaling_url.clone().unwrap_or_default(),
        secret: cfg.recording.recorder_secret.clone().unwrap_or_default(),
        name,
        capacity: r.capacity,
        bind: r.bind_ip,
    };
    // Printed for scripts, as `serve` prints its address.
    println!("confer recorder for {}", worker.signaling);
    let (shutdown, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_requested().await;
        let _ = shutdown.send(true);
    });
    // Returns once the recordings in progress are stored.
    confer_recorder::worker::run(worker, store, settings, stopping).await;
    Ok(())
}

/// How long a shutdown waits for recordings to be stored: below the 30 s
/// that Kubernetes and systemd wait before killing.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(25);

/// Ctrl-C, or SIGTERM (systemd, Docker and Kubernetes stopping it).
async fn stop_requested() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("SIGTERM cannot be handled: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
