//! A server's WebRTC transport, without the webrtc crate's driver: what an
//! SFU needs to send media to a browser, and to receive what it publishes,
//! at the cost of the work itself.
//!
//! The server is ICE-lite (one host candidate, it answers checks and never
//! makes them) and, where it can choose, the DTLS server. It offers what it
//! sends (it knows which tracks), and answers what a client publishes.
//! Everything is sans I/O: a [`Connection`] takes datagrams and returns
//! datagrams; the caller owns sockets and clocks.
//!
//! - [`ice`]: connectivity checks and their answers.
//! - [`dtls`]: the server certificate, the handshake and the SRTP keys.
//! - [`sdp`]: the offer written from plain data, the answer read back.
//! - [`publish`]: a publishing client's offer read, the answer written.
//! - [`connection`]: the three together for one client.
//! - [`stream`]: one outgoing RTP stream: SRTP, retransmissions on RTX,
//!   sender reports.
//! - [`seal`]: SRTP (AES-128-GCM) sealed in place, for those streams.
//! - [`feedback`]: what the client says back (RTCP), as plain values.
//! - [`receive`]: one incoming RTP stream: what is missing (NACK), and the
//!   reception report.
//! - [`arrivals`]: transport-wide congestion feedback on what arrived.

pub mod arrivals;
pub mod connection;
pub mod dtls;
pub mod feedback;
pub mod ice;
pub mod publish;
pub mod receive;
pub mod sdp;
pub mod seal;
pub mod stream;

pub use connection::{Connection, Received};
pub use dtls::Certificate;
pub use feedback::Feedback;
pub use stream::{OutStream, Rtx};

/// Why a description, a handshake or a packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("session description: {0}")]
    Sdp(String),
    #[error("DTLS: {0}")]
    Dtls(String),
    #[error("SRTP: {0}")]
    Srtp(String),
    #[error("RTP: {0}")]
    Rtp(String),
    #[error("RTCP: {0}")]
    Rtcp(String),
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("the client closed the connection")]
    Closed,
}
