//! Confer's selective forwarding unit.
//!
//! Every participant has a peer connection (or, on a downlink, connections
//! of our own). What a participant publishes is forwarded, without
//! decoding, to every other participant in the room;
//! each receiver gets its own rewritten copy (SSRC, sequence, timestamp,
//! payload type, header-extension ids) so streams stay continuous for it.
//!
//! - [`room`]: the [`Sfu`] (all rooms), [`Room`], membership and room events.
//! - [`peer`]: a [`Participant`]'s peer connection and its negotiation.
//! - [`track`]: a published track, its receivers and the forwarding loop.
//! - [`forward`]: the per-receiver RTP rewrite, as plain data.
//! - [`simulcast`]: layers, the layer each receiver gets, keyframes.
//! - [`bandwidth`]: each receiver's estimated downlink and the layers that fit.
//! - [`keyframe`]: PLI/FIR relay, coalesced and rate-limited.
//! - [`tap`]: a room's media as it arrives, for the recorder.
//! - `mux`: every participant's media on one UDP port; `outbox`: its sends,
//!   batched.
//! - `downlink`: what a participant receives, on a connection of our own
//!   (`confer-transport`) instead of its peer connection, when it asks;
//!   `sent`: what it sent, for congestion feedback.
//! - `uplink`: what such a participant publishes, on a connection of our
//!   own as well: it then has no webrtc peer connection at all.
//! - [`config`]: media-plane settings.
//!
//! The SFU knows nothing of tokens, schedules or WebSockets: signaling admits
//! a participant with [`Sfu::join`] and relays the [`PeerEvent`]s it gets back.

pub mod bandwidth;
pub mod config;
mod downlink;
mod error;
pub mod forward;
pub mod keyframe;
mod mux;
mod outbox;
pub mod peer;
pub mod room;
mod sent;
pub mod simulcast;
pub mod tap;
pub mod track;
mod uplink;

pub use config::{IceServer, SfuConfig};
pub use error::SfuError;
pub use mux::MediaSocket;
pub use peer::Participant;
pub use room::{
    Joined, Lifecycle, ParticipantInfo, ParticipantSummary, PeerEvent, RecordingState, Role, Room,
    RoomEvent, RoomSummary, Sfu,
};
pub use track::{TrackInfo, TrackKind};
/// The candidate type clients send, re-exported so signaling need not depend on webrtc.
pub use webrtc::peer_connection::RTCIceCandidateInit;
