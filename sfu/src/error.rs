use thiserror::Error;

/// Why the SFU refused or failed an operation. Signaling turns these into
/// error codes for the client; none of them affects other participants.
#[derive(Debug, Error)]
pub enum SfuError {
    #[error("room {0:?} is full")]
    RoomFull(String),
    #[error("room {0:?} is closed")]
    RoomClosed(String),
    #[error("participant {0:?} is not in this room")]
    UnknownParticipant(String),
    #[error("no track {0:?} is forwarded to you")]
    UnknownTrack(String),
    #[error("invalid session description: {0}")]
    BadSdp(String),
    #[error("invalid ICE candidate: {0}")]
    BadCandidate(String),
    #[error("no free UDP port in {min}..={max}")]
    NoPort { min: u16, max: u16 },
    #[error("sfu.udp_port: cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("a downlink needs the shared media socket (sfu.udp_mux = true)")]
    DownlinkNeedsMux,
    #[error("transport: {0}")]
    Transport(#[from] confer_transport::Error),
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::error::Error),
}
