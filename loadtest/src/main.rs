//! `confer-load`: runs a load scenario against a running Confer and reports.

use anyhow::Context;
use clap::Parser;
use confer_loadtest::confer::Tokens;
use confer_loadtest::run::{self, Plan, Server, Target};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "confer-load",
    about = "Load generator for Confer (see loadtest/README.md)"
)]
struct Cli {
    /// meeting-10, webinar, audio-100 or many-rooms; the flags below adjust it.
    #[arg(long, default_value = "meeting-10")]
    scenario: String,
    /// Confer's HTTP address; with --janus Janus's WebSocket (ws://host:port);
    /// with --probe the probe forwarder's udp://host:port.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The server is Janus (VideoRoom plugin), not Confer.
    #[arg(long)]
    janus: bool,
    /// The server is the bare-limit probe forwarder at --url (udp://host:port).
    #[arg(long, conflicts_with = "janus")]
    probe: bool,
    /// Run the bare-limit probe forwarder on this UDP address instead of a
    /// load; it prints `probe forwarding on ADDR` and runs until killed.
    #[arg(long, value_name = "ADDR")]
    probe_forward: Option<std::net::SocketAddr>,
    /// Address the simulated peers bind to.
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// The home server's token secret (auth.token_secret); without it, demo
    /// tokens are asked of the server.
    #[arg(long, env = "LOAD_TOKEN_SECRET")]
    token_secret: Option<String>,
    /// A server process to sample for CPU and memory (repeat for split roles).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    #[arg(long)]
    rooms: Option<usize>,
    /// Publishers per room (each also subscribes to the others).
    #[arg(long)]
    publishers: Option<usize>,
    /// Receive-only participants per room.
    #[arg(long)]
    subscribers: Option<usize>,
    /// Publishers per room that talk; the rest are muted (default: all talk).
    #[arg(long)]
    speakers: Option<usize>,
    /// Publish audio only.
    #[arg(long)]
    audio_only: bool,
    /// VP8 bitrate, bit/s.
    #[arg(long)]
    video_bitrate: Option<u64>,
    /// Publish video as three simulcast layers (10 %, 30 % and all of the
    /// video bitrate), as browsers send a camera. Confer only.
    #[arg(long)]
    simulcast: bool,
    /// Send each video frame's packets at once instead of pacing them as
    /// a browser does (2.5 times the bitrate, a burst every 5 ms).
    #[arg(long)]
    no_pacing: bool,
    /// Confer only: receive on a downlink of its own (`"downlink": true` at
    /// join), not on the peer connection each participant publishes on.
    #[arg(long)]
    downlink: bool,
    /// Seconds between keyframes.
    #[arg(long)]
    keyframe_interval: Option<f64>,
    /// Seconds of the measured window.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds between everyone being connected and the window opening.
    #[arg(long)]
    warmup: Option<f64>,
    /// Joins per second.
    #[arg(long)]
    ramp: Option<f64>,
    /// Write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG chart of throughput, CPU and latency over time here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Exit 1 unless every subscriber got media from every publisher with no loss.
    #[arg(long)]
    check: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

fn plan(cli: &Cli) -> anyhow::Result<Plan> {
    let mut p = Plan::scenario(&cli.scenario).with_context(|| {
        format!(
            "--scenario: unknown {:?}; use meeting-10, webinar, audio-100 or many-rooms",
            cli.scenario
        )
    })?;
    let secs = |s: f64, flag: &str| {
        Duration::try_from_secs_f64(s).with_context(|| format!("{flag}: not a duration: {s}"))
    };
    p.rooms = cli.rooms.unwrap_or(p.rooms);
    p.publishers = cli.publishers.unwrap_or(p.publishers);
    p.subscribers = cli.subscribers.unwrap_or(p.subscribers);
    p.speakers = cli.speakers.or(p.speakers);
    p.video &= !cli.audio_only;
    p.video_shape_bps = cli.video_bitrate.unwrap_or(p.video_shape_bps);
    if let Some(k) = cli.keyframe_interval {
        p.keyframe_every = secs(k, "--keyframe-interval")?;
    }
    if let Some(d) = cli.duration {
        p.duration = secs(d, "--duration")?;
    }
    if let Some(w) = cli.warmup {
        p.warmup = secs(w, "--warmup")?;
    }
    p.ramp_per_s = cli.ramp.unwrap_or(p.ramp_per_s);
    p.simulcast = cli.simulcast;
    p.pacing = !cli.no_pacing;
    p.downlink = cli.downlink;
    anyhow::ensure!(
        !(p.downlink && (cli.janus || cli.probe)),
        "--downlink: Confer only"
    );
    anyhow::ensure!(
        !(p.simulcast && (cli.janus || cli.probe)),
        "--simulcast: Confer only (the Janus adapter and the probe forward one stream per track)"
    );
    anyhow::ensure!(p.video || !p.simulcast, "--simulcast: needs video");
    anyhow::ensure!(p.rooms > 0, "--rooms: must be at least 1");
    anyhow::ensure!(p.publishers > 0, "--publishers: must be at least 1");
    anyhow::ensure!(p.ramp_per_s > 0.0, "--ramp: must be above 0");
    Ok(p)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LOAD_LOG")
                .unwrap_or_else(|_| EnvFilter::new("warn,webrtc=error,rtc=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(listen) = cli.probe_forward {
        let socket = confer_loadtest::probe::bind(listen)
            .with_context(|| format!("--probe-forward: cannot bind {listen}"))?;
        println!("probe forwarding on {}", socket.local_addr()?);
        return confer_loadtest::probe::forward(socket);
    }
    let plan = plan(&cli)?;
    let url = cli.url.trim_end_matches('/').to_owned();
    let server = if cli.janus {
        Server::Janus { url }
    } else if cli.probe {
        let addr = url.strip_prefix("udp://").unwrap_or(&url);
        Server::Probe {
            addr: addr
                .parse()
                .with_context(|| format!("--url: {url:?} is not udp://host:port"))?,
        }
    } else {
        Server::Confer {
            base: url,
            tokens: match &cli.token_secret {
                Some(s) => Tokens::Secret(s.clone()),
                None => Tokens::Demo,
            },
        }
    };
    let target = Arc::new(Target {
        server,
        pids: cli.pids.clone(),
    });
    let report = run::run(&plan, target, cli.bind_ip, !cli.quiet).await?;
    print!("{}", report.summary());
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("--json: cannot write {}", path.display()))?;
    }
    if let Some(path) = &cli.plot {
        confer_loadtest::plot::svg(&report, path)?;
    }
    if cli.check && !report.is_clean() {
        anyhow::bail!("check failed: some media did not arrive, or some was lost");
    }
    Ok(())
}
