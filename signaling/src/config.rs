//! The configuration file, environment overrides, and validation.
//!
//! Precedence: command-line flags over `CONFER_*` environment variables over
//! the file over built-in defaults. Every error names the key at fault.

use confer_sfu::SfuConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP and WebSocket address.
    pub listen: SocketAddr,
    /// Where Confer keeps its files (recordings, local schedules).
    pub data_dir: PathBuf,
    pub auth: AuthConfig,
    pub sfu: SfuConfig,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret the home server signs join tokens with (HS256).
    pub token_secret: Option<String>,
    /// Ed25519 public key (PEM file) the home server signs with (EdDSA),
    /// instead of or in addition to the shared secret.
    pub token_public_key_file: Option<PathBuf>,
    /// Bearer secret for the admin API; the admin API is off without it.
    pub admin_secret: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().unwrap(),
            data_dir: PathBuf::from("confer-data"),
            auth: AuthConfig::default(),
            sfu: SfuConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Tables of the file; `CONFER_SFU_UDP_PORT_MIN` is `sfu.udp_port_min`.
const SECTIONS: &[&str] = &["auth", "sfu"];

impl Config {
    /// Reads `path` (if any), applies `CONFER_*` variables from `env`, validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: p.to_owned(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("CONFER_") else {
                continue;
            };
            if rest == "CONFIG" || rest == "LOG" {
                continue;
            }
            let lower = rest.to_ascii_lowercase();
            let (section, key) = match SECTIONS
                .iter()
                .find(|s| lower.starts_with(&format!("{s}_")))
            {
                Some(s) => (Some(*s), lower[s.len() + 1..].to_owned()),
                None => (None, lower),
            };
            let target = match section {
                Some(s) => table
                    .entry(s)
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| invalid(s, "must be a table"))?,
                None => &mut table,
            };
            target.insert(key, env_value(&value));
        }
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                invalid(&key, e.into_inner().to_string())
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.sfu.validate().map_err(|e| invalid(e.key, e.message))?;
        if let Some(s) = &self.auth.token_secret
            && s.len() < 32
        {
            return Err(invalid(
                "auth.token_secret",
                "must be at least 32 characters (HS256 needs 256 bits of key)",
            ));
        }
        if let Some(s) = &self.auth.admin_secret
            && s.len() < 16
        {
            return Err(invalid(
                "auth.admin_secret",
                "must be at least 16 characters",
            ));
        }
        if let Some(p) = &self.auth.token_public_key_file
            && !p.is_file()
        {
            return Err(invalid(
                "auth.token_public_key_file",
                format!("{} is not a readable file", p.display()),
            ));
        }
        Ok(())
    }

    /// Demo mode (self-service tokens) is on only when nothing can sign tokens.
    pub fn demo_mode(&self) -> bool {
        self.auth.token_secret.is_none() && self.auth.token_public_key_file.is_none()
    }
}

/// Environment values are typed like TOML values where they parse as one
/// (numbers, booleans, arrays), and are strings otherwise.
fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn example_config_in_deploy_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/confer.toml");
        let cfg = Config::load(Some(&path), []).unwrap();
        assert!(!cfg.demo_mode());
    }

    #[test]
    fn env_overrides_file_and_is_typed() {
        let cfg = Config::load(
            None,
            env(&[
                ("CONFER_LISTEN", "127.0.0.1:9999"),
                ("CONFER_SFU_UDP_PORT_MIN", "40000"),
                ("CONFER_SFU_UDP_PORT_MAX", "40010"),
                ("CONFER_DATA_DIR", "/tmp/x"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9999);
        assert_eq!(cfg.sfu.udp_port_min, 40000);
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        assert!(cfg.demo_mode());
    }

    #[test]
    fn errors_name_the_bad_key() {
        let err = |pairs: &[(&str, &str)]| Config::load(None, env(pairs)).unwrap_err().to_string();
        assert!(err(&[("CONFER_SFU_UDP_PORT_MIN", "banana")]).starts_with("sfu.udp_port_min:"));
        assert!(err(&[("CONFER_LISTEN", "nowhere")]).starts_with("listen:"));
        assert!(err(&[("CONFER_AUTH_TOKEN_SECRET", "short")]).starts_with("auth.token_secret:"));
        assert!(err(&[("CONFER_SFU_ICE_IP", "0.0.0.0")]).starts_with("sfu.ice_ip:"));
        assert!(err(&[("CONFER_SFU_COLOUR", "blue")]).contains("colour"));
    }
}
