//! Confer's load generator: simulated participants that speak Confer's
//! signaling protocol and real WebRTC (ICE, DTLS-SRTP) over loopback,
//! publishing generated Opus- and VP8-shaped media and measuring, per packet,
//! latency through the server, loss and jitter, while sampling the server
//! process's CPU and memory.
//!
//! - [`media`]: generated payloads and the measurement marker they carry.
//! - [`peer`]: a participant's peer connection, publishing and receiving.
//! - [`confer`]: joining a Confer room (tokens, the WebSocket protocol).
//! - [`janus`]: the same against Janus's VideoRoom, for comparison.
//! - [`probe`]: the bare-limit forwarder (SRTP in, SRTP out, nothing else)
//!   and its participants: the cost of the work itself.
//! - [`stats`]: loss, jitter and latency as subscribers see them.
//! - [`process`]: CPU time and memory from /proc; the machine.
//! - [`run`]: one run of a [`run::Plan`], from ramp-up to the report.
//! - [`report`]: the JSON report and its human summary; [`plot`] draws it.

pub mod confer;
pub mod janus;
pub mod media;
pub mod peer;
pub mod plot;
pub mod probe;
pub mod process;
pub mod report;
pub mod run;
pub mod stats;
