//! The JSON report (`loadtest/README.md` documents it) and its human summary.

use crate::media::MAX_LAYERS;
use crate::process::Machine;
use serde::Serialize;

pub const SCHEMA: &str = "confer-load/1";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// `confer`, `janus` or `probe`.
    pub target: String,
    pub scenario: String,
    pub machine: Machine,
    pub plan: PlanReport,
    pub participants: Participants,
    /// Length of the steady-state window the rates below are measured over.
    pub window_s: f64,
    pub packets: Packets,
    /// `None` when no server process was given to sample.
    pub server: Option<ServerUsage>,
    pub generator: Generator,
    pub latency_ms: Percentiles,
    pub loss: Loss,
    pub jitter_ms: JitterReport,
    pub join_ms: Percentiles,
    pub streams: Streams,
    pub timeline: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub rooms: usize,
    pub publishers_per_room: usize,
    pub subscribers_per_room: usize,
    /// Publishers per room that talk; `null`: all of them.
    pub speakers_per_room: Option<usize>,
    pub video: bool,
    pub video_bitrate_bps: u64,
    /// Video sent as three simulcast layers (`--simulcast`).
    pub simulcast: bool,
    /// Video paced as a browser sends it (false with `--no-pacing`).
    pub pacing: bool,
    /// Confer's participants received on downlinks (`--downlink`).
    #[serde(default)]
    pub downlink: bool,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub ramp_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Participants {
    pub planned: usize,
    pub joined: usize,
    pub failed: usize,
    /// The first few join errors, verbatim.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Packets {
    /// Written by publishers during the window.
    pub sent: u64,
    /// Received by subscribers during the window: what the server forwarded.
    pub forwarded: u64,
    pub forwarded_per_s: f64,
    pub forwarded_mbit_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerUsage {
    pub pids: Vec<u32>,
    pub cpu_s: f64,
    /// Of one core.
    pub cpu_percent: f64,
    pub cpu_us_per_forwarded_packet: f64,
    pub forwarded_packets_per_core_s: f64,
    pub rss_bytes: u64,
    /// Growth of resident memory since before the first join, per participant.
    pub rss_per_participant_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generator {
    /// Of one core; a generator near 100 % measures itself, not the server.
    pub cpu_percent: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Loss {
    pub expected: u64,
    pub received: u64,
    pub fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JitterReport {
    pub mean: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Streams {
    /// (subscriber, publisher, kind) triples that should carry media.
    pub expected: usize,
    /// Those of them that delivered nothing.
    pub missing: usize,
    /// Muted publishers' audio that arrived anyway (silence a server forwarded).
    pub unexpected: usize,
    /// Times the server paused a video for a subscriber because its link
    /// fit no layer: on loopback, a false alarm.
    pub paused: u64,
    /// Video packets received per simulcast layer, smallest first (a single
    /// stream counts as layer 0).
    pub video_packets_by_layer: [u64; MAX_LAYERS as usize],
}

/// One second of the run, from the first join.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub joined: u64,
    pub forwarded_per_s: f64,
    pub server_cpu_percent: Option<f64>,
    pub server_rss_bytes: Option<u64>,
    pub generator_cpu_percent: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

impl Report {
    /// Media reached everyone it should, none was lost, and no muted
    /// microphone's silence was forwarded.
    pub fn is_clean(&self) -> bool {
        self.participants.failed == 0
            && self.streams.missing == 0
            && self.streams.unexpected == 0
            && self.streams.paused == 0
            && self.loss.expected > 0
            && self.loss.received == self.loss.expected
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} on {} ({} CPUs, {})\n",
            self.scenario, self.target, self.machine.cpus, self.machine.cpu_model
        );
        let p = &self.participants;
        s += &format!(
            "  participants   {} joined of {} ({} failed) in {} room(s)\n",
            p.joined, p.planned, p.failed, self.plan.rooms
        );
        s += &format!(
            "  forwarded      {:.0} packets/s, {:.1} Mbit/s over {:.1} s\n",
            self.packets.forwarded_per_s, self.packets.forwarded_mbit_per_s, self.window_s
        );
        if let Some(srv) = &self.server {
            s += &format!(
                "  server CPU     {:.1} % of a core, {:.2} µs per forwarded packet, {:.0} packets/s per core\n",
                srv.cpu_percent, srv.cpu_us_per_forwarded_packet, srv.forwarded_packets_per_core_s
            );
            s += &format!(
                "  server memory  {:.1} MB resident, {:.2} MB per participant\n",
                srv.rss_bytes as f64 / 1e6,
                srv.rss_per_participant_bytes as f64 / 1e6
            );
        }
        let l = &self.latency_ms;
        s += &format!(
            "  latency        p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
            l.p50, l.p95, l.p99, l.max
        );
        s += &format!(
            "  loss           {:.3} % ({} of {} packets), jitter mean {:.2} ms\n",
            self.loss.fraction * 100.0,
            self.loss.expected - self.loss.received,
            self.loss.expected,
            self.jitter_ms.mean
        );
        s += &format!(
            "  join           p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms (token to first media)\n",
            self.join_ms.p50, self.join_ms.p95, self.join_ms.max
        );
        s += &format!(
            "  streams        {} of {} delivered media, {} muted ones forwarded, {} videos paused; generator CPU {:.1} %\n",
            self.streams.expected - self.streams.missing,
            self.streams.expected,
            self.streams.unexpected,
            self.streams.paused,
            self.generator.cpu_percent
        );
        if self.plan.simulcast {
            s += &format!(
                "  layers         video packets received per layer, smallest first: {:?}\n",
                self.streams.video_packets_by_layer
            );
        }
        for e in &self.participants.errors {
            s += &format!("  join error     {e}\n");
        }
        s
    }
}
