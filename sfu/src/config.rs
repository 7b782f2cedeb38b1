//! Media-plane settings. The signaling crate reads them from the config file;
//! validation lives here so the SFU never starts with settings it cannot honour.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SfuConfig {
    /// Address the media sockets bind to and offer as host candidates.
    pub ice_ip: IpAddr,
    /// Every participant's media on this one UDP port (`udp_mux`, the
    /// default); 0 lets the OS pick one at start (tests run several
    /// instances side by side).
    pub udp_port: u16,
    /// One port for all participants (`udp_port`), or, when false, a port
    /// of its own for each from `udp_port_min..=udp_port_max`.
    pub udp_mux: bool,
    /// First and last UDP port for media when `udp_mux` is false;
    /// 0..0 lets the OS pick.
    pub udp_port_min: u16,
    pub udp_port_max: u16,
    /// The public address in front of `ice_ip` on a 1:1 NAT (cloud hosts).
    pub public_ip: Option<IpAddr>,
    /// STUN/TURN servers handed to clients. The SFU itself needs none.
    pub ice_servers: Vec<IceServer>,
    /// How long an empty room lives on before it is removed.
    #[serde(with = "secs")]
    pub empty_room_grace: Duration,
    /// How long a participant may stay ICE-disconnected before removal.
    #[serde(with = "secs")]
    pub disconnect_timeout: Duration,
    /// Most participants one room admits.
    pub max_participants: usize,
    /// Estimate each receiver's downlink from its congestion feedback and
    /// send it only the video layers that fit. Off: every receiver gets what
    /// its tile size and loss ask for.
    pub bandwidth_estimation: bool,
    /// Forward only this many of a room's microphones, the loudest (by the
    /// audio levels clients send); 0 forwards every one. Silent ones are
    /// never forwarded either way.
    pub audio_last_n: usize,
    /// A participant that receives on a downlink publishes on a connection
    /// of our own too (ICE-lite, DTLS-SRTP, NACK, congestion feedback)
    /// rather than a webrtc peer connection: a quarter less CPU per packet
    /// forwarded in a meeting. Off: the webrtc peer connection, as before.
    pub own_uplink: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl Default for SfuConfig {
    fn default() -> Self {
        SfuConfig {
            ice_ip: IpAddr::from([127, 0, 0, 1]),
            udp_port: 50000,
            udp_mux: true,
            udp_port_min: 50000,
            udp_port_max: 50999,
            public_ip: None,
            ice_servers: Vec::new(),
            empty_room_grace: Duration::from_secs(30),
            disconnect_timeout: Duration::from_secs(5),
            max_participants: 100,
            bandwidth_estimation: true,
            audio_last_n: 6,
            own_uplink: true,
        }
    }
}

/// A setting that cannot work, with the key that holds it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidSetting {
    pub key: &'static str,
    pub message: String,
}

impl SfuConfig {
    /// Checks the settings; keys are named as in the `[sfu]` table.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = |key, message: &str| {
            Err(InvalidSetting {
                key,
                message: message.to_owned(),
            })
        };
        if self.ice_ip.is_unspecified() {
            return bad(
                "sfu.ice_ip",
                "must be a concrete address (the one clients reach), not 0.0.0.0 or ::",
            );
        }
        if !self.udp_mux && self.udp_port_min > self.udp_port_max {
            return bad("sfu.udp_port_min", "is above sfu.udp_port_max");
        }
        if !self.udp_mux && (self.udp_port_min == 0) != (self.udp_port_max == 0) {
            return bad(
                "sfu.udp_port_min",
                "0 (any port) must be set for both udp_port_min and udp_port_max",
            );
        }
        for s in &self.ice_servers {
            if s.urls.is_empty() {
                return bad(
                    "sfu.ice_servers.urls",
                    "an ICE server needs at least one URL",
                );
            }
            for u in &s.urls {
                if !(u.starts_with("stun:") || u.starts_with("turn:") || u.starts_with("turns:")) {
                    return bad(
                        "sfu.ice_servers.urls",
                        &format!("{u:?} is not a stun:, turn: or turns: URL"),
                    );
                }
            }
        }
        if self.disconnect_timeout > Duration::from_secs(14) {
            return bad(
                "sfu.disconnect_timeout",
                "must be at most 14 s so vanished participants go within 15 s",
            );
        }
        if self.max_participants == 0 {
            return bad("sfu.max_participants", "must be at least 1");
        }
        Ok(())
    }
}

/// Durations are whole seconds in the config file.
pub mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        SfuConfig::default().validate().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let c = SfuConfig {
            udp_mux: false,
            udp_port_min: 6000,
            udp_port_max: 5000,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "sfu.udp_port_min");
        let c = SfuConfig {
            ice_servers: vec![IceServer {
                urls: vec!["http://x".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("sfu.ice_servers.urls")
        );
    }
}
