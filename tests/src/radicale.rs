//! A real CalDAV server for the schedule tests: Radicale from PyPI
//! (`scripts/setup --test` installs it), on 127.0.0.1 with file storage in a
//! temporary directory and one user with a password.

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const USER: &str = "confer";
pub const PASSWORD: &str = "calendar-password";

pub struct Radicale {
    pub base: String,
    child: Child,
    dir: PathBuf,
}

/// `RADICALE`, else the venv `scripts/setup --test` makes, else `PATH`.
fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("RADICALE") {
        return Ok(p.into());
    }
    let tools = std::env::var_os("TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/confer")
        });
    let venv = tools.join("venv/bin/radicale");
    if venv.is_file() {
        return Ok(venv);
    }
    let on_path = Command::new("sh")
        .args(["-c", "command -v radicale"])
        .output()?;
    if on_path.status.success() {
        return Ok(String::from_utf8_lossy(&on_path.stdout).trim().into());
    }
    bail!("radicale not found: run scripts/setup --test (or set RADICALE)")
}

impl Radicale {
    pub async fn start() -> anyhow::Result<Radicale> {
        let dir =
            std::env::temp_dir().join(format!("confer-radicale-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir)?;
        let htpasswd = dir.join("users");
        std::fs::write(&htpasswd, format!("{USER}:{PASSWORD}\n"))?;
        // Free port: bind, note, release. Radicale binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(binary()?)
            .arg("--server-hosts")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--storage-filesystem-folder")
            .arg(dir.join("collections"))
            .args([
                "--auth-type",
                "htpasswd",
                "--auth-htpasswd-encryption",
                "plain",
            ])
            .arg("--auth-htpasswd-filename")
            .arg(&htpasswd)
            .args(["--logging-level", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting radicale")?;
        let r = Radicale {
            base: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("radicale did not listen on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(r)
    }

    /// Creates a calendar and returns its URL.
    pub async fn calendar(&self, name: &str) -> anyhow::Result<String> {
        let url = format!("{}/{USER}/{name}/", self.base);
        let resp = reqwest::Client::new()
            .request(reqwest::Method::from_bytes(b"MKCALENDAR")?, &url)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("MKCALENDAR {url}: {}", resp.status());
        }
        Ok(url)
    }

    /// Stores an iCalendar object in `calendar` (as any CalDAV client would).
    pub async fn put(&self, calendar: &str, uid: &str, ics: &str) -> anyhow::Result<()> {
        let resp = reqwest::Client::new()
            .put(format!("{calendar}{uid}.ics"))
            .basic_auth(USER, Some(PASSWORD))
            .header("Content-Type", "text/calendar; charset=utf-8")
            .body(ics.replace('\n', "\r\n"))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "PUT {uid}: {} {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for Radicale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
