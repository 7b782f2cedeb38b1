//! One load run: join everyone at the ramp rate, let it settle, measure a
//! steady window while sampling the server, stop, drain, and report.

use crate::confer::{Participant, Tokens};
use crate::media::{self, Kind, VideoShape};
use crate::peer::{Publish, Shared};
use crate::process::{self, Usage};
use crate::report::*;
use crate::stats::{self, Counters, Sent, Subscriber};
use crate::{janus, probe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: String,
    pub rooms: usize,
    /// Per room; publishers also subscribe to everyone else.
    pub publishers: usize,
    /// Per room, receive only.
    pub subscribers: usize,
    /// Publishers per room that talk; the others are muted, sending the
    /// digital silence a browser sends (`None`: everyone talks).
    pub speakers: Option<usize>,
    pub video: bool,
    pub video_shape_bps: u64,
    /// Video as three simulcast layers, as browsers send a camera.
    pub simulcast: bool,
    /// Video leaves as a browser's pacer sends it ([`media::Pacer`]);
    /// off, each frame's packets leave at once.
    pub pacing: bool,
    /// Confer's participants receive on a downlink of their own.
    pub downlink: bool,
    pub keyframe_every: Duration,
    pub duration: Duration,
    pub warmup: Duration,
    /// Joins per second.
    pub ramp_per_s: f64,
}

impl Plan {
    /// The standard scenarios of `loadtest/README.md`.
    pub fn scenario(name: &str) -> Option<Plan> {
        let base = Plan {
            scenario: name.to_owned(),
            rooms: 1,
            publishers: 10,
            subscribers: 0,
            speakers: None,
            video: true,
            video_shape_bps: 1_200_000,
            simulcast: false,
            pacing: true,
            downlink: false,
            keyframe_every: Duration::from_secs(3),
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            ramp_per_s: 10.0,
        };
        Some(match name {
            "meeting-10" => base,
            "webinar" => Plan {
                publishers: 1,
                subscribers: 50,
                ..base
            },
            "audio-100" => Plan {
                publishers: 100,
                // As in a real large meeting: a few talk, the rest are muted.
                speakers: Some(3),
                video: false,
                ramp_per_s: 20.0,
                ..base
            },
            "many-rooms" => Plan {
                rooms: 50,
                publishers: 3,
                ramp_per_s: 20.0,
                ..base
            },
            _ => return None,
        })
    }

    pub fn participants(&self) -> usize {
        self.rooms * (self.publishers + self.subscribers)
    }
}

/// Which server, and how to reach it.
pub enum Server {
    /// `base` is `http://host:port` of Confer's signaling.
    Confer { base: String, tokens: Tokens },
    /// `url` is the `ws://host:port` of Janus's WebSocket transport.
    Janus { url: String },
    /// The bare-limit forwarder ([`crate::probe`]).
    Probe { addr: std::net::SocketAddr },
}

/// Where the participants go.
pub struct Target {
    pub server: Server,
    /// Server processes to sample (one, or one per role when split).
    pub pids: Vec<u32>,
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self.server {
            Server::Confer { .. } => "confer",
            Server::Janus { .. } => "janus",
            Server::Probe { .. } => "probe",
        }
    }
}

/// A joined participant, on either server.
enum Conn {
    Confer(Participant),
    Janus(janus::Participant, bool),
    Probe(probe::Participant),
}

impl Conn {
    /// What the receiving side measured.
    fn stats(&self) -> &Arc<Mutex<Subscriber>> {
        match self {
            Conn::Confer(p) => &p.peer.stats,
            Conn::Janus(p, _) => &p.subscriber.stats,
            Conn::Probe(p) => &p.stats,
        }
    }

    /// What the publishing side sent.
    fn sent(&self) -> &Arc<Sent> {
        match self {
            Conn::Confer(p) => &p.peer.sent,
            Conn::Janus(p, _) => &p.publisher.sent,
            Conn::Probe(p) => &p.sent,
        }
    }

    fn start_publishing(&self, index: u32, speaking: bool, shared: Arc<Shared>) {
        match self {
            Conn::Confer(p) => p.peer.start_publishing(index, speaking, shared),
            Conn::Janus(p, _) => p.publisher.start_publishing(index, speaking, shared),
            Conn::Probe(p) => p.start_publishing(index, speaking, shared),
        }
    }

    fn is_connected(&self) -> bool {
        match self {
            Conn::Confer(p) => p.peer.is_connected(),
            Conn::Janus(p, publishes) => {
                p.subscriber.is_connected() && (!publishes || p.publisher.is_connected())
            }
            Conn::Probe(p) => p.is_connected(),
        }
    }

    async fn leave(&self) {
        match self {
            Conn::Confer(p) => p.leave().await,
            Conn::Janus(p, _) => p.leave().await,
            Conn::Probe(p) => p.leave().await,
        }
    }
}

async fn join(
    server: &Server,
    http: &reqwest::Client,
    (room, name): (&str, &str),
    publish: Publish,
    other_publishers: usize,
    started_us: u64,
    shared: Arc<Shared>,
) -> anyhow::Result<Conn> {
    Ok(match server {
        Server::Confer { base, tokens } => {
            let token = tokens.get(http, base, name, room).await?;
            Conn::Confer(Participant::join(base, &token, name, publish, started_us, shared).await?)
        }
        Server::Janus { url } => Conn::Janus(
            janus::Participant::join(
                url,
                room,
                name,
                publish,
                other_publishers,
                started_us,
                shared,
            )
            .await?,
            publish != Publish::Nothing,
        ),
        Server::Probe { addr } => {
            Conn::Probe(probe::Participant::join(*addr, room, publish, started_us, shared).await?)
        }
    })
}

struct Member {
    room: usize,
    /// Publisher index, when it publishes.
    publisher: Option<u32>,
    speaking: bool,
    stats: Arc<Mutex<Subscriber>>,
    sent: Arc<Sent>,
    conn: Conn,
}

#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    server: Option<Usage>,
    generator: Usage,
    forwarded: u64,
    forwarded_bytes: u64,
    sent: u64,
    joined: u64,
    failed: u64,
    paused: u64,
}

fn snapshot(pids: &[u32], counters: &Counters) -> Snapshot {
    let server = (!pids.is_empty()).then(|| {
        pids.iter()
            .filter_map(|&p| process::usage(p).ok())
            .fold(Usage::default(), |a, u| Usage {
                cpu: a.cpu + u.cpu,
                rss_bytes: a.rss_bytes + u.rss_bytes,
            })
    });
    Snapshot {
        at: Instant::now(),
        server,
        generator: process::usage(std::process::id()).unwrap_or_default(),
        forwarded: counters.received_packets.load(Ordering::Relaxed),
        forwarded_bytes: counters.received_bytes.load(Ordering::Relaxed),
        sent: counters.sent_packets.load(Ordering::Relaxed),
        joined: counters.joined.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        paused: counters.paused_videos.load(Ordering::Relaxed),
    }
}

fn percent(cpu: Duration, over: Duration) -> f64 {
    cpu.as_secs_f64() / over.as_secs_f64().max(1e-9) * 100.0
}

pub async fn run(
    plan: &Plan,
    target: Arc<Target>,
    bind_ip: std::net::IpAddr,
    progress: bool,
) -> anyhow::Result<Report> {
    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        video: VideoShape {
            bitrate_bps: plan.video_shape_bps,
            keyframe_every: plan.keyframe_every,
            ..VideoShape::default()
        },
        simulcast: plan.simulcast,
        pacing: plan.pacing,
        downlink: plan.downlink,
        stop,
        bind_ip,
    });
    let http = reqwest::Client::new();
    let baseline = snapshot(&target.pids, &shared.counters);
    let target = &target;
    let run_id: u32 = rand::random();
    let members: Arc<Mutex<Vec<Member>>> = Default::default();
    let errors: Arc<Mutex<Vec<String>>> = Default::default();
    let started = Instant::now();
    let started_us = media::clock();
    let timeline: Arc<Mutex<Vec<Snapshot>>> = Arc::new(Mutex::new(vec![baseline]));
    let sampler = tokio::spawn(sample_every_second(
        target.pids.clone(),
        shared.clone(),
        timeline.clone(),
        progress.then_some(started),
    ));

    // Join at the ramp rate, each join on its own task.
    let total = plan.participants();
    let per_room = plan.publishers + plan.subscribers;
    let mut joins = Vec::new();
    let mut ramp = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.ramp_per_s.max(0.01)));
    for i in 0..total {
        ramp.tick().await;
        let (room, slot) = (i / per_room, i % per_room);
        let publisher = (slot < plan.publishers).then_some(i as u32);
        let speaking = slot < plan.speakers.unwrap_or(plan.publishers);
        let publish = match (publisher, plan.video) {
            (None, _) => Publish::Nothing,
            (Some(_), false) => Publish::Audio,
            (Some(_), true) => Publish::AudioVideo,
        };
        let (shared, http, members, errors) = (
            shared.clone(),
            http.clone(),
            members.clone(),
            errors.clone(),
        );
        let target = target.clone();
        let room_id = format!("load-{run_id:08x}-{room}");
        let other_publishers = plan.publishers - usize::from(publisher.is_some());
        joins.push(tokio::spawn(async move {
            let name = format!("p{i}");
            let started_us = media::clock();
            let joined = join(
                &target.server,
                &http,
                (&room_id, &name),
                publish,
                other_publishers,
                started_us,
                shared.clone(),
            )
            .await;
            match joined {
                Ok(conn) => {
                    if let Some(index) = publisher {
                        conn.start_publishing(index, speaking, shared.clone());
                    }
                    shared.counters.joined.fetch_add(1, Ordering::Relaxed);
                    members.lock().unwrap().push(Member {
                        room,
                        publisher,
                        speaking,
                        stats: conn.stats().clone(),
                        sent: conn.sent().clone(),
                        conn,
                    });
                }
                Err(e) => {
                    shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                    let mut errors = errors.lock().unwrap();
                    if errors.len() < 5 {
                        errors.push(format!("{name}: {e:#}"));
                    }
                }
            }
        }));
    }
    for j in joins {
        let _ = j.await;
    }
    // Every peer connected, or give up after a while and measure what is.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !members
            .lock()
            .unwrap()
            .iter()
            .all(|m| m.conn.is_connected())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Settle, then measure the steady window.
    tokio::time::sleep(plan.warmup).await;
    let window_start = snapshot(&target.pids, &shared.counters);
    let win_from_us = media::clock();
    tokio::time::sleep(plan.duration).await;
    let window_end = snapshot(&target.pids, &shared.counters);
    let win_to_us = media::clock();
    sampler.abort();
    let timeline_raw = std::mem::take(&mut *timeline.lock().unwrap());

    // Stop publishing, let what is in flight arrive, then tally.
    let _ = stop_tx.send(true);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let members = std::mem::take(&mut *members.lock().unwrap());
    for m in &members {
        m.conn.leave().await;
    }

    let errors = errors.lock().unwrap().clone();
    Ok(assemble(
        plan,
        target,
        &members,
        errors,
        (&baseline, &window_start, &window_end),
        (win_from_us, win_to_us),
        &timeline_raw,
        (started, started_us),
    ))
}

/// Samples the server and the counters each second; prints progress if asked.
async fn sample_every_second(
    pids: Vec<u32>,
    shared: Arc<Shared>,
    timeline: Arc<Mutex<Vec<Snapshot>>>,
    progress: Option<Instant>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let s = snapshot(&pids, &shared.counters);
        let mut t = timeline.lock().unwrap();
        if let (Some(started), Some(prev)) = (progress, t.last()) {
            eprintln!("{}", progress_line(prev, &s, started));
        }
        t.push(s);
    }
}

fn progress_line(prev: &Snapshot, now: &Snapshot, started: Instant) -> String {
    let dt = now.at.duration_since(prev.at);
    let rate = (now.forwarded - prev.forwarded) as f64 / dt.as_secs_f64();
    let sent = (now.sent - prev.sent) as f64 / dt.as_secs_f64();
    let server = match (prev.server, now.server) {
        (Some(a), Some(b)) => format!(
            "server {:5.1} % CPU {:6.1} MB",
            percent(b.cpu.saturating_sub(a.cpu), dt),
            b.rss_bytes as f64 / 1e6
        ),
        _ => String::new(),
    };
    format!(
        "{:5.0} s  joined {:4} failed {:3}  sent {:7.0}/s  forwarded {:8.0}/s  {}  generator {:5.1} % CPU",
        now.at.duration_since(started).as_secs_f64(),
        now.joined,
        now.failed,
        sent,
        rate,
        server,
        percent(now.generator.cpu.saturating_sub(prev.generator.cpu), dt),
    )
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    plan: &Plan,
    target: &Target,
    members: &[Member],
    errors: Vec<String>,
    (baseline, w0, w1): (&Snapshot, &Snapshot, &Snapshot),
    (from_us, to_us): (u64, u64),
    timeline: &[Snapshot],
    (started, t0_us): (Instant, u64),
) -> Report {
    let window = w1.at.duration_since(w0.at);
    let forwarded = w1.forwarded - w0.forwarded;
    let kinds: &[Kind] = if plan.video {
        &[Kind::Audio, Kind::Video]
    } else {
        &[Kind::Audio]
    };

    // Loss and completeness, against what each publisher actually sent.
    let publishers: Vec<(usize, u32, bool, &Arc<Sent>)> = members
        .iter()
        .filter_map(|m| m.publisher.map(|p| (m.room, p, m.speaking, &m.sent)))
        .collect();
    let (mut expected, mut received, mut streams, mut missing) = (0, 0, 0, 0);
    let mut unexpected = 0;
    let mut by_layer = [0u64; media::MAX_LAYERS as usize];
    let mut jitters = Vec::new();
    let mut latencies = Vec::new();
    let mut joins = Vec::new();
    let mut per_second: Vec<Vec<u32>> = vec![Vec::new(); timeline.len() + 2];
    for m in members {
        let sub = m.stats.lock().unwrap();
        for &(room, p, speaking, sent) in &publishers {
            if room != m.room || Some(p) == m.publisher {
                continue;
            }
            for &k in kinds {
                // A muted microphone's silence is not expected to arrive.
                let layers: Vec<(u8, &stats::Stream)> = (0..media::MAX_LAYERS)
                    .filter_map(|l| Some((l, sub.streams.get(&(p, k, l))?)))
                    .collect();
                if k == Kind::Audio && !speaking {
                    unexpected += usize::from(!layers.is_empty());
                    continue;
                }
                streams += 1;
                if layers.is_empty() {
                    missing += 1;
                }
                // A simulcast layer is received while the server picks it,
                // so only holes within what arrived of it count as lost.
                let simulcast = plan.simulcast && k == Kind::Video;
                for (layer, s) in layers {
                    if k == Kind::Video {
                        by_layer[layer as usize] += s.received;
                    }
                    let last = if simulcast { None } else { sent.last(k) };
                    let (e, r) = stats::expected_and_received(s, last);
                    expected += e;
                    received += r;
                    jitters.push(s.jitter_us / 1000.0);
                }
            }
        }
        for &(at, lat) in &sub.latencies {
            if (from_us..=to_us).contains(&at) {
                latencies.push(lat);
            }
            let sec = (at.saturating_sub(t0_us) / 1_000_000) as usize;
            if let Some(bucket) = per_second.get_mut(sec) {
                bucket.push(lat);
            }
        }
        if let Some(j) = sub.join_us() {
            tracing::debug!(publisher = ?m.publisher, room = m.room, join_ms = j / 1000, "joined");
            joins.push(j.min(u32::MAX as u64) as u32);
        }
    }

    let timeline = timeline
        .windows(2)
        .map(|w| {
            let dt = w[1].at.duration_since(w[0].at);
            let t_s = w[1].at.duration_since(started).as_secs_f64();
            let second = (t_s.floor() as usize).saturating_sub(1);
            let bucket = per_second.get_mut(second).map(std::mem::take);
            let (p50, p99) = bucket
                .filter(|b| !b.is_empty())
                .map(|mut b| {
                    b.sort_unstable();
                    (
                        Some(stats::quantile(&b, 0.5) as f64 / 1000.0),
                        Some(stats::quantile(&b, 0.99) as f64 / 1000.0),
                    )
                })
                .unwrap_or((None, None));
            Sample {
                t_s,
                joined: w[1].joined,
                forwarded_per_s: (w[1].forwarded - w[0].forwarded) as f64 / dt.as_secs_f64(),
                server_cpu_percent: w[0]
                    .server
                    .zip(w[1].server)
                    .map(|(a, b)| percent(b.cpu.saturating_sub(a.cpu), dt)),
                server_rss_bytes: w[1].server.map(|u| u.rss_bytes),
                generator_cpu_percent: percent(
                    w[1].generator.cpu.saturating_sub(w[0].generator.cpu),
                    dt,
                ),
                latency_p50_ms: p50,
                latency_p99_ms: p99,
            }
        })
        .collect();

    let server = w0.server.zip(w1.server).map(|(a, b)| {
        let cpu = b.cpu.saturating_sub(a.cpu);
        let base_rss = baseline.server.map_or(0, |u| u.rss_bytes);
        ServerUsage {
            pids: target.pids.clone(),
            cpu_s: cpu.as_secs_f64(),
            cpu_percent: percent(cpu, window),
            cpu_us_per_forwarded_packet: cpu.as_secs_f64() * 1e6 / forwarded.max(1) as f64,
            forwarded_packets_per_core_s: forwarded as f64 / cpu.as_secs_f64().max(1e-9),
            rss_bytes: b.rss_bytes,
            rss_per_participant_bytes: b.rss_bytes.saturating_sub(base_rss)
                / members.len().max(1) as u64,
        }
    });
    let gen_cpu = w1.generator.cpu.saturating_sub(w0.generator.cpu);
    latencies.sort_unstable();
    joins.sort_unstable();
    Report {
        schema: SCHEMA,
        target: target.name().into(),
        scenario: plan.scenario.clone(),
        machine: process::machine(),
        plan: PlanReport {
            rooms: plan.rooms,
            publishers_per_room: plan.publishers,
            subscribers_per_room: plan.subscribers,
            speakers_per_room: plan.speakers,
            video: plan.video,
            video_bitrate_bps: plan.video_shape_bps,
            simulcast: plan.simulcast,
            pacing: plan.pacing,
            downlink: plan.downlink,
            duration_s: plan.duration.as_secs_f64(),
            warmup_s: plan.warmup.as_secs_f64(),
            ramp_per_s: plan.ramp_per_s,
        },
        participants: Participants {
            planned: plan.participants(),
            joined: members.len(),
            failed: plan.participants() - members.len(),
            errors,
        },
        window_s: window.as_secs_f64(),
        packets: Packets {
            sent: w1.sent - w0.sent,
            forwarded,
            forwarded_per_s: forwarded as f64 / window.as_secs_f64().max(1e-9),
            forwarded_mbit_per_s: (w1.forwarded_bytes - w0.forwarded_bytes) as f64 * 8.0
                / 1e6
                / window.as_secs_f64().max(1e-9),
        },
        server,
        generator: Generator {
            cpu_percent: percent(gen_cpu, window),
        },
        latency_ms: percentiles(&latencies, 1000.0),
        loss: Loss {
            expected,
            received,
            fraction: if expected == 0 {
                0.0
            } else {
                (expected - received) as f64 / expected as f64
            },
        },
        jitter_ms: JitterReport {
            mean: jitters.iter().sum::<f64>() / jitters.len().max(1) as f64,
            max: jitters.iter().copied().fold(0.0, f64::max),
        },
        join_ms: percentiles(&joins, 1000.0),
        streams: Streams {
            expected: streams,
            missing,
            unexpected,
            paused: w1.paused,
            video_packets_by_layer: by_layer,
        },
        timeline,
    }
}

/// Percentiles of sorted values, divided by `unit`.
fn percentiles(sorted: &[u32], unit: f64) -> Percentiles {
    Percentiles {
        count: sorted.len(),
        p50: stats::quantile(sorted, 0.5) as f64 / unit,
        p95: stats::quantile(sorted, 0.95) as f64 / unit,
        p99: stats::quantile(sorted, 0.99) as f64 / unit,
        max: sorted.last().copied().unwrap_or(0) as f64 / unit,
    }
}
