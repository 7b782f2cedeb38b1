//! The configuration file, environment overrides, and validation.
//!
//! Precedence: command-line flags over `CONFER_*` environment variables over
//! the file over built-in defaults. Every error names the key at fault.

use confer_sfu::SfuConfig;
use confer_sfu::config::secs;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP and WebSocket address.
    pub listen: SocketAddr,
    /// Where Confer keeps its files (recordings, local schedules).
    pub data_dir: PathBuf,
    pub auth: AuthConfig,
    pub sfu: SfuConfig,
    pub schedule: ScheduleConfig,
    pub webhooks: WebhookConfig,
    pub recording: RecordingConfig,
    /// For `confer recorder` only.
    pub recorder: RecorderConfig,
    /// For split deployments (`confer signaling` and `confer sfu`).
    pub split: SplitConfig,
}

/// A split deployment: `confer signaling` drives the rooms on one or more
/// `confer sfu` nodes (`docs/sfu-nodes.md`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// `confer signaling`: the SFU nodes' base URLs (their `listen`
    /// address), e.g. `["http://10.0.0.7:8081"]`.
    pub sfu_nodes: Vec<String>,
    /// Shared by signaling and every SFU node, at least 32 characters.
    pub secret: Option<String>,
}

impl SplitConfig {
    fn validate_secret(&self) -> Result<(), ConfigError> {
        match &self.secret {
            None => Err(invalid("split.secret", "must be set")),
            Some(s) if s.len() < 32 => {
                Err(invalid("split.secret", "must be at least 32 characters"))
            }
            Some(_) => Ok(()),
        }
    }
}

/// Recordings (`docs/recording.md`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Moderators may record meetings.
    pub enabled: bool,
    /// Days a recording is kept, then deleted.
    pub keep_days: u32,
    /// Seconds per segment: at most this much is lost if the process dies.
    pub segment_seconds: u32,
    /// Where finished recordings are kept; defaults to `recordings` in the data dir.
    pub local_dir: Option<PathBuf>,
    /// Segments in progress; defaults to `spool` in the data dir.
    pub spool_dir: Option<PathBuf>,
    /// Most the spool may hold, in MB (recordings in progress and those
    /// waiting for an unreachable store); 0: no bound.
    pub spool_max_mb: u64,
    /// Seconds between expiry sweeps.
    #[serde(with = "secs")]
    pub sweep_interval: Duration,
    /// `local` (a directory; the default) or `s3`.
    pub store: StoreKind,
    pub s3: S3Config,
    /// `embedded` (the default): this process records. `remote`: recorder
    /// processes (`confer recorder`) connect and are given the recordings.
    pub recorders: RecorderMode,
    /// The bearer secret recorder processes connect with (at least 32
    /// characters); required with `recorders = "remote"`, and by
    /// `confer recorder`.
    pub recorder_secret: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecorderMode {
    Embedded,
    Remote,
}

/// A recorder process (`confer recorder`): where signaling is, and how much
/// it takes on. It stores into the `[recording]` store, which must be the
/// one signaling lists from (S3, or a shared directory).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecorderConfig {
    /// Signaling's base URL, e.g. `http://10.0.0.5:8080`.
    pub signaling_url: Option<String>,
    /// Shown in signaling's logs; defaults to the host name.
    pub name: Option<String>,
    /// Most recordings at once.
    pub capacity: u32,
    /// Address its WebRTC sockets bind: one the SFU can reach (this
    /// machine's address when the SFU is on another).
    pub bind_ip: std::net::IpAddr,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            signaling_url: None,
            name: None,
            capacity: 4,
            bind_ip: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }
}

impl RecorderConfig {
    fn validate(&self, recording: &RecordingConfig) -> Result<(), ConfigError> {
        match &self.signaling_url {
            None => return Err(invalid("recorder.signaling_url", "must be set")),
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(invalid(
                    "recorder.signaling_url",
                    "must start with http:// or https://",
                ));
            }
            Some(_) => {}
        }
        if recording.recorder_secret.is_none() {
            return Err(invalid("recording.recorder_secret", "must be set"));
        }
        if !(1..=1000).contains(&self.capacity) {
            return Err(invalid("recorder.capacity", "must be 1 to 1000"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Local,
    S3,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Omit for AWS; e.g. `http://127.0.0.1:3900` for Garage.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style URLs (Garage, MinIO, Ceph want this).
    pub path_style: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: "us-east-1".into(),
            bucket: None,
            access_key_id: None,
            secret_access_key: None,
            path_style: false,
        }
    }
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            enabled: true,
            keep_days: 30,
            segment_seconds: 10,
            local_dir: None,
            spool_dir: None,
            spool_max_mb: 10_240,
            sweep_interval: Duration::from_secs(3600),
            store: StoreKind::Local,
            s3: S3Config::default(),
            recorders: RecorderMode::Embedded,
            recorder_secret: None,
        }
    }
}

/// Where meeting schedules come from (`docs/home-server.md`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `local` (a file in the data dir; the default), `caldav`, `http`, or
    /// `none` (the token alone admits; for home servers that check the
    /// schedule before they sign a token).
    pub source: SourceKind,
    /// Seconds before the start that people may join.
    #[serde(with = "secs")]
    pub early_join: Duration,
    /// Seconds after the end that people may still join; then the room closes.
    #[serde(with = "secs")]
    pub grace: Duration,
    /// Seconds before closing that everyone is warned.
    #[serde(with = "secs")]
    pub warn_before_close: Duration,
    /// How long an answer from the home server is reused.
    #[serde(with = "secs")]
    pub cache_ttl: Duration,
    /// Per-request time-out towards the home server.
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// Extra attempts after a failed request, with doubling back-off from 250 ms.
    pub retries: u32,
    /// A new join while the home server is unreachable: `use_cache` admits
    /// from an answer at most `stale_limit` seconds old, `refuse` refuses.
    /// People already in the meeting always stay.
    pub when_unreachable: Unreachable,
    #[serde(with = "secs")]
    pub stale_limit: Duration,
    /// Zone for calendar times that carry none ("floating" times), IANA name.
    pub timezone: String,
    pub local: LocalScheduleConfig,
    pub caldav: CaldavConfig,
    pub http: HttpScheduleConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Local,
    Caldav,
    Http,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unreachable {
    UseCache,
    Refuse,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalScheduleConfig {
    /// Defaults to `meetings.json` in the data dir.
    pub file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaldavConfig {
    /// Calendar collection URLs searched for the meeting, in order.
    pub calendars: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpScheduleConfig {
    /// URL template with `{room}`, and optionally `{from}` and `{to}`.
    pub url: Option<String>,
    /// Header sent with every request, e.g. `Authorization`.
    pub auth_header: Option<String>,
    pub auth_value: Option<String>,
}

/// Call history to the home server (`docs/webhooks.md`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where events are POSTed; webhooks are off without it.
    pub url: Option<String>,
    /// HMAC-SHA256 key for the `Confer-Signature` header.
    pub secret: Option<String>,
    #[serde(with = "secs")]
    pub timeout: Duration,
    /// An event not delivered within this many seconds is dropped (and logged).
    #[serde(with = "secs")]
    pub give_up_after: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            source: SourceKind::Local,
            early_join: Duration::from_secs(10 * 60),
            grace: Duration::from_secs(15 * 60),
            warn_before_close: Duration::from_secs(5 * 60),
            cache_ttl: Duration::from_secs(120),
            timeout: Duration::from_secs(3),
            retries: 2,
            when_unreachable: Unreachable::UseCache,
            stale_limit: Duration::from_secs(3600),
            timezone: "UTC".into(),
            local: Default::default(),
            caldav: Default::default(),
            http: Default::default(),
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: None,
            secret: None,
            timeout: Duration::from_secs(5),
            give_up_after: Duration::from_secs(24 * 3600),
        }
    }
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
            schedule: ScheduleConfig::default(),
            webhooks: WebhookConfig::default(),
            recording: RecordingConfig::default(),
            recorder: RecorderConfig::default(),
            split: SplitConfig::default(),
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

/// Tables of the file, longest first; `CONFER_SFU_UDP_PORT_MIN` is
/// `sfu.udp_port_min`, `CONFER_SCHEDULE_CALDAV_PASSWORD` is
/// `schedule.caldav.password`.
const SECTIONS: &[&str] = &[
    "schedule.caldav",
    "schedule.local",
    "schedule.http",
    "schedule",
    "webhooks",
    "recording.s3",
    "recording",
    "recorder",
    "split",
    "auth",
    "sfu",
];

impl Config {
    /// Reads `path` (if any), applies `CONFER_*` variables from `env`, and
    /// validates it for the server.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let cfg = Self::read(path, env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// As [`Config::load`], validated for `confer recorder`.
    pub fn load_recorder(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let cfg = Self::read(path, env)?;
        cfg.validate_recorder()?;
        Ok(cfg)
    }

    /// As [`Config::load`], validated for `confer signaling`.
    pub fn load_signaling(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let cfg = Self::read(path, env)?;
        cfg.validate()?;
        cfg.validate_signaling()?;
        Ok(cfg)
    }

    /// As [`Config::load`], validated for `confer sfu`: `listen`, `[sfu]`
    /// and `split.secret`; nothing else is its business.
    pub fn load_sfu_node(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let cfg = Self::read(path, env)?;
        cfg.sfu.validate().map_err(|e| invalid(e.key, e.message))?;
        cfg.split.validate_secret()?;
        Ok(cfg)
    }

    fn read(
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
                .find(|s| lower.starts_with(&format!("{}_", s.replace('.', "_"))))
            {
                Some(s) => (Some(*s), lower[s.len() + 1..].to_owned()),
                None => (None, lower),
            };
            let mut target = &mut table;
            for part in section.into_iter().flat_map(|s| s.split('.')) {
                target = target
                    .entry(part)
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| invalid(section.unwrap_or(part), "must be a table"))?;
            }
            target.insert(key, env_value(&value));
        }
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                invalid(&key, e.into_inner().to_string())
            })?;
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
        self.validate_schedule()?;
        self.validate_recording()?;
        if let Some(url) = &self.webhooks.url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(
                    "webhooks.url",
                    "must be an http:// or https:// URL",
                ));
            }
            if self.webhooks.secret.as_ref().is_none_or(|s| s.len() < 16) {
                return Err(invalid(
                    "webhooks.secret",
                    "must be set, at least 16 characters, when webhooks.url is",
                ));
            }
        }
        Ok(())
    }

    fn validate_signaling(&self) -> Result<(), ConfigError> {
        if self.split.sfu_nodes.is_empty() {
            return Err(invalid(
                "split.sfu_nodes",
                "must list at least one SFU node URL (where `confer sfu` listens)",
            ));
        }
        for (i, u) in self.split.sfu_nodes.iter().enumerate() {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(invalid(
                    &format!("split.sfu_nodes[{i}]"),
                    "must start with http:// or https://",
                ));
            }
        }
        self.split.validate_secret()?;
        if self.recording.enabled && self.recording.recorders == RecorderMode::Embedded {
            return Err(invalid(
                "recording.recorders",
                "must be \"remote\" with `confer signaling` (an embedded recorder needs the SFU in its process), or set recording.enabled = false",
            ));
        }
        Ok(())
    }

    /// What `confer recorder` needs: `[recording]` and `[recorder]`; the
    /// server's own keys (schedule, webhooks, …) are not its business.
    pub fn validate_recorder(&self) -> Result<(), ConfigError> {
        self.validate_recording()?;
        self.recorder.validate(&self.recording)
    }

    fn validate_recording(&self) -> Result<(), ConfigError> {
        if !(1..=3650).contains(&self.recording.keep_days) {
            return Err(invalid("recording.keep_days", "must be 1 to 3650"));
        }
        if !(2..=300).contains(&self.recording.segment_seconds) {
            return Err(invalid("recording.segment_seconds", "must be 2 to 300"));
        }
        if let Some(s) = &self.recording.recorder_secret
            && s.len() < 32
        {
            return Err(invalid(
                "recording.recorder_secret",
                "must be at least 32 characters",
            ));
        }
        if self.recording.recorders == RecorderMode::Remote
            && self.recording.recorder_secret.is_none()
        {
            return Err(invalid(
                "recording.recorder_secret",
                "must be set when recording.recorders is \"remote\"",
            ));
        }
        if self.recording.sweep_interval.is_zero() {
            return Err(invalid("recording.sweep_interval", "must be at least 1"));
        }
        if self.recording.store == StoreKind::S3 {
            let s3 = &self.recording.s3;
            for (key, value) in [
                ("recording.s3.bucket", &s3.bucket),
                ("recording.s3.access_key_id", &s3.access_key_id),
                ("recording.s3.secret_access_key", &s3.secret_access_key),
            ] {
                if value.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid(key, "must be set when recording.store is \"s3\""));
                }
            }
            if let Some(e) = &s3.endpoint
                && !(e.starts_with("http://") || e.starts_with("https://"))
            {
                return Err(invalid(
                    "recording.s3.endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        Ok(())
    }

    fn validate_schedule(&self) -> Result<(), ConfigError> {
        let s = &self.schedule;
        let day = Duration::from_secs(12 * 3600);
        if s.early_join > day {
            return Err(invalid(
                "schedule.early_join",
                "must be at most 43200 (12 hours)",
            ));
        }
        if s.grace > day {
            return Err(invalid(
                "schedule.grace",
                "must be at most 43200 (12 hours)",
            ));
        }
        if s.cache_ttl > Duration::from_secs(3600) {
            return Err(invalid("schedule.cache_ttl", "must be at most 3600"));
        }
        if s.timeout.is_zero() || s.timeout > Duration::from_secs(30) {
            return Err(invalid("schedule.timeout", "must be 1 to 30 seconds"));
        }
        if s.retries > 5 {
            return Err(invalid("schedule.retries", "must be at most 5"));
        }
        if s.timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(invalid(
                "schedule.timezone",
                format!("{:?} is not an IANA time zone name", s.timezone),
            ));
        }
        let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        match s.source {
            SourceKind::Caldav => {
                if s.caldav.calendars.is_empty() {
                    return Err(invalid(
                        "schedule.caldav.calendars",
                        "list at least one calendar URL when schedule.source is \"caldav\"",
                    ));
                }
                if let Some(u) = s.caldav.calendars.iter().find(|u| !url_ok(u)) {
                    return Err(invalid(
                        "schedule.caldav.calendars",
                        format!("{u:?} is not an http:// or https:// URL"),
                    ));
                }
            }
            SourceKind::Http => match &s.http.url {
                None => {
                    return Err(invalid(
                        "schedule.http.url",
                        "must be set when schedule.source is \"http\"",
                    ));
                }
                Some(u) if !url_ok(u) || !u.contains("{room}") => {
                    return Err(invalid(
                        "schedule.http.url",
                        "must be an http:// or https:// URL containing {room}",
                    ));
                }
                Some(_) => {}
            },
            SourceKind::Local | SourceKind::None => {}
        }
        if s.http.auth_header.is_some() != s.http.auth_value.is_some() {
            return Err(invalid(
                "schedule.http.auth_value",
                "auth_header and auth_value go together",
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

    /// The Kubernetes example: its file with the variables its Deployment
    /// sets (from the node and from the Secret), and the image's defaults.
    #[test]
    fn kubernetes_example_is_valid() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        // The variables a manifest sets, with made-up values; the image's too.
        let vars_of = |manifest: &str| -> Vec<(String, String)> {
            let manifest = std::fs::read_to_string(deploy.join(manifest)).unwrap();
            let dockerfile = std::fs::read_to_string(deploy.join("Dockerfile")).unwrap();
            // The image's variables first: a manifest's override them.
            let image_env = dockerfile
                .lines()
                .find_map(|l| l.strip_prefix("ENV "))
                .unwrap();
            let mut vars: Vec<(String, String)> = image_env
                .split_whitespace()
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap();
                    (name.to_owned(), value.to_owned())
                })
                .collect();
            let set: Vec<(String, String)> = manifest
                .lines()
                .filter_map(|l| l.trim().strip_prefix("- name: CONFER_"))
                .map(|name| {
                    let value = match name {
                        "SFU_ICE_IP" | "RECORDER_BIND_IP" => "10.0.0.5",
                        "LISTEN" => "0.0.0.0:8081",
                        "RECORDER_SIGNALING_URL" => "http://confer",
                        _ => "a-secret-from-kubernetes-0123456789abcdef",
                    };
                    (format!("CONFER_{name}"), value.to_owned())
                })
                .collect();
            assert!(set.len() >= 3, "{set:?}");
            vars.extend(set);
            vars
        };
        let config = deploy.join("kubernetes/confer.toml");
        let cfg = Config::load(Some(&config), vars_of("kubernetes/deployment.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!cfg.demo_mode());
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/confer"));
        assert_eq!(cfg.sfu.ice_ip.to_string(), "10.0.0.5");
        // The recorder pods, with the same configuration.
        let mut vars = vars_of("kubernetes/recorder.yaml");
        vars.push(("CONFER_RECORDING_RECORDERS".into(), "remote".into()));
        let cfg = Config::load_recorder(Some(&config), vars).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.recorder.bind_ip.to_string(), "10.0.0.5");
        // The SFU node pods, and signaling driving them, as sfu.yaml says.
        let cfg = Config::load_sfu_node(Some(&config), vars_of("kubernetes/sfu.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.listen.to_string(), "0.0.0.0:8081");
        let header = std::fs::read_to_string(deploy.join("kubernetes/sfu.yaml")).unwrap();
        let nodes = header
            .lines()
            .find_map(|l| l.strip_prefix("#   CONFER_SPLIT_SFU_NODES="))
            .unwrap()
            .trim_matches('\'');
        let mut vars = vars_of("kubernetes/deployment.yaml");
        vars.extend([
            ("CONFER_SPLIT_SFU_NODES".into(), nodes.into()),
            (
                "CONFER_SPLIT_SECRET".into(),
                "a-secret-from-kubernetes-0123456789abcdef".into(),
            ),
            ("CONFER_RECORDING_RECORDERS".into(), "remote".into()),
            (
                "CONFER_RECORDING_RECORDER_SECRET".into(),
                "a-secret-from-kubernetes-0123456789abcdef".into(),
            ),
        ]);
        let cfg = Config::load_signaling(Some(&config), vars).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.split.sfu_nodes.len(), 2);
    }

    #[test]
    fn env_overrides_file_and_is_typed() {
        let cfg = Config::load(
            None,
            env(&[
                ("CONFER_LISTEN", "127.0.0.1:9999"),
                ("CONFER_SFU_UDP_PORT_MIN", "40000"),
                ("CONFER_SFU_UDP_PORT_MAX", "40010"),
                ("CONFER_SFU_UDP_PORT", "40100"),
                ("CONFER_SFU_UDP_MUX", "false"),
                ("CONFER_DATA_DIR", "/tmp/x"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9999);
        assert_eq!(cfg.sfu.udp_port_min, 40000);
        assert_eq!(cfg.sfu.udp_port, 40100);
        assert!(!cfg.sfu.udp_mux);
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
        assert!(
            err(&[("CONFER_SCHEDULE_SOURCE", "caldav")]).starts_with("schedule.caldav.calendars:")
        );
        assert!(err(&[("CONFER_SCHEDULE_SOURCE", "outlook")]).starts_with("schedule.source:"));
        assert!(
            err(&[("CONFER_SCHEDULE_TIMEZONE", "Mars/Base")]).starts_with("schedule.timezone:")
        );
        assert!(
            err(&[
                ("CONFER_SCHEDULE_CALDAV_CALENDARS", "[\"ftp://x\"]"),
                ("CONFER_SCHEDULE_SOURCE", "caldav")
            ])
            .starts_with("schedule.caldav.calendars:")
        );
        assert!(err(&[("CONFER_WEBHOOKS_URL", "http://h/x")]).starts_with("webhooks.secret:"));
    }

    #[test]
    fn split_roles_check_their_own_keys() {
        const SECRET: &str = "a-split-secret-of-thirty-two-chars-or-more";
        let signaling = |pairs: &[(&str, &str)]| {
            Config::load_signaling(None, env(pairs)).map_err(|e| e.to_string())
        };
        let node = |pairs: &[(&str, &str)]| {
            Config::load_sfu_node(None, env(pairs)).map_err(|e| e.to_string())
        };
        let nodes = ("CONFER_SPLIT_SFU_NODES", "[\"http://10.0.0.7:8081\"]");
        let secret = ("CONFER_SPLIT_SECRET", SECRET);
        let remote = ("CONFER_RECORDING_RECORDERS", "remote");
        let recorder_secret = ("CONFER_RECORDING_RECORDER_SECRET", SECRET);
        assert!(
            signaling(&[secret])
                .unwrap_err()
                .starts_with("split.sfu_nodes:")
        );
        assert!(
            signaling(&[nodes])
                .unwrap_err()
                .starts_with("split.secret:")
        );
        let err = signaling(&[nodes, secret]).unwrap_err();
        assert!(err.starts_with("recording.recorders:"), "{err}");
        let cfg = signaling(&[nodes, secret, remote, recorder_secret]).unwrap();
        assert_eq!(cfg.split.sfu_nodes, ["http://10.0.0.7:8081"]);
        let off = ("CONFER_RECORDING_ENABLED", "false");
        assert!(signaling(&[nodes, secret, off]).is_ok());
        let bad = ("CONFER_SPLIT_SFU_NODES", "[\"10.0.0.7:8081\"]");
        let err = signaling(&[bad, secret, off]).unwrap_err();
        assert!(err.starts_with("split.sfu_nodes[0]:"), "{err}");
        // A node needs the secret, and ignores the server's keys.
        assert!(node(&[]).unwrap_err().starts_with("split.secret:"));
        assert!(
            node(&[("CONFER_SPLIT_SECRET", "short")])
                .unwrap_err()
                .starts_with("split.secret:")
        );
        assert!(node(&[secret, ("CONFER_WEBHOOKS_URL", "http://h/x")]).is_ok());
        let err = node(&[secret, ("CONFER_SFU_ICE_IP", "0.0.0.0")]).unwrap_err();
        assert!(err.starts_with("sfu.ice_ip:"), "{err}");
    }

    #[test]
    fn nested_sections_from_the_environment() {
        let cfg = Config::load(
            None,
            env(&[
                ("CONFER_SCHEDULE_SOURCE", "http"),
                ("CONFER_SCHEDULE_HTTP_URL", "http://127.0.0.1:9/m/{room}"),
                ("CONFER_SCHEDULE_CACHE_TTL", "5"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.schedule.source, SourceKind::Http);
        assert_eq!(cfg.schedule.cache_ttl, Duration::from_secs(5));
        assert_eq!(
            cfg.schedule.http.url.as_deref(),
            Some("http://127.0.0.1:9/m/{room}")
        );
    }
}
