//! A real S3 server for the recording tests: Garage, single node, on
//! 127.0.0.1 with its data in a temporary directory. `.ci/run` (and
//! `scripts/setup --test`) install the binary once with `cargo install`.

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "recordings";
pub const REGION: &str = "garage";

pub struct Garage {
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
    config: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    port: u16,
}

/// `GARAGE`, else where `scripts/setup --test` installs it, else `PATH`.
fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GARAGE") {
        return Ok(p.into());
    }
    let tools = std::env::var_os("TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/confer")
        });
    let cached = tools.join("tools/bin/garage");
    if cached.is_file() {
        return Ok(cached);
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v garage"])
        .output()?;
    if on_path.status.success() {
        return Ok(String::from_utf8_lossy(&on_path.stdout).trim().into());
    }
    bail!("garage not found: run scripts/setup --test (or set GARAGE)")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Garage {
    pub async fn start() -> anyhow::Result<Garage> {
        let dir = std::env::temp_dir().join(format!("confer-garage-{}", hex(8)));
        std::fs::create_dir_all(&dir)?;
        let (s3, rpc) = (free_port()?, free_port()?);
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                d = dir.display(),
                secret = hex(32),
            ),
        )?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))?;
        }
        let mut g = Garage {
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: format!("GK{}", hex(12)),
            secret: hex(32),
            config,
            dir,
            child: None,
            port: s3,
        };
        g.resume().await?;
        // Single-node layout, a key of our choosing, the bucket.
        let status = g.cli(&["status"])?;
        let node = status
            .lines()
            .find(|l| l.contains("NO ROLE ASSIGNED"))
            .and_then(|l| l.split_whitespace().next())
            .context("garage status shows no node")?
            .to_owned();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])?;
        g.cli(&["layout", "apply", "--version", "1"])?;
        let (id, secret) = (g.key_id.clone(), g.secret.clone());
        g.cli(&["key", "import", "--yes", "-n", "confer", &id, &secret])?;
        g.cli(&["bucket", "create", BUCKET])?;
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "confer",
        ])?;
        Ok(g)
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(binary()?)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "garage {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server (an outage); `resume` brings it back with its data.
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let child = Command::new(binary()?)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting garage")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok();
            if up && self.cli(&["status"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("garage did not come up on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.pause();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
