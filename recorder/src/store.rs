//! Where recordings are kept: a small object-store trait with a local
//! directory (the embedded default) behind it, and S3 for larger installs.
//!
//! Keys look like `recordings/{room}/{recording id}/recording.webm`; the
//! recording's metadata is a JSON [`Manifest`] beside the media, so listing
//! a meeting's recordings is a prefix listing and no database is needed.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const PREFIX: &str = "recordings/";
pub const MANIFEST: &str = "manifest.json";
pub const MEDIA: &str = "recording.webm";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("bad key {0:?}")]
    BadKey(String),
    #[error("{0}")]
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Random, 128 bits: keys are not guessable.
    pub id: String,
    pub room: String,
    pub title: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub participants: Vec<Person>,
    pub size: u64,
    pub expires_at: DateTime<Utc>,
    pub content_type: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Person {
    pub user_id: String,
    pub name: String,
}

/// The key of a recording's object named `leaf`.
pub fn key(room: &str, id: &str, leaf: &str) -> String {
    format!("{PREFIX}{room}/{id}/{leaf}")
}

/// How a client gets the bytes of an object.
pub enum Download {
    /// A pre-signed URL, valid for minutes.
    Url(String),
    /// A local file, served (with Range support) by signaling.
    File(PathBuf),
}

#[async_trait::async_trait]
pub trait Store: Send + Sync {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, StoreError>;
    async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError>;
    /// `None` if there is no such object.
    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Keys under `prefix`, in order.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    async fn download(&self, key: &str, filename: &str) -> Result<Download, StoreError>;
}

/// Objects as files under a directory.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        // Keys are ours, but never let one walk out of the root.
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(StoreError::BadKey(key.to_owned()));
        }
        Ok(self.root.join(key))
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

#[async_trait::async_trait]
impl Store for LocalStore {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, StoreError> {
        let dest = self.path(key)?;
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        let tmp = dest.with_extension("part");
        let size = tokio::fs::copy(path, &tmp).await.map_err(io)?;
        tokio::fs::rename(&tmp, &dest).await.map_err(io)?;
        Ok(size)
    }

    async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let dest = self.path(key)?;
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        let tmp = dest.with_extension("part");
        tokio::fs::write(&tmp, bytes).await.map_err(io)?;
        tokio::fs::rename(&tmp, &dest).await.map_err(io)
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match tokio::fs::read(self.path(key)?).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let mut rd = match tokio::fs::read_dir(&dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            while let Some(entry) = rd.next_entry().await.map_err(io)? {
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let rel = rel.to_string_lossy().replace('\\', "/");
                if entry.file_type().await.map_err(io)?.is_dir() {
                    // Only descend where the prefix can still match.
                    let as_dir = format!("{rel}/");
                    if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                        dirs.push(path);
                    }
                } else if rel.starts_with(prefix) && !rel.ends_with(".part") {
                    out.push(rel);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Tidy empty directories up to the root.
        let mut dir = path.parent().map(Path::to_owned);
        while let Some(d) = dir {
            if d == self.root || tokio::fs::remove_dir(&d).await.is_err() {
                break;
            }
            dir = d.parent().map(Path::to_owned);
        }
        Ok(())
    }

    async fn download(&self, key: &str, _filename: &str) -> Result<Download, StoreError> {
        Ok(Download::File(self.path(key)?))
    }
}

/// Recordings of `room` that have not expired, newest first.
pub async fn list_recordings(
    store: &dyn Store,
    room: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Manifest>, StoreError> {
    let mut out = Vec::new();
    for k in store.list(&format!("{PREFIX}{room}/")).await? {
        if !k.ends_with(&format!("/{MANIFEST}")) {
            continue;
        }
        let Some(bytes) = store.get_bytes(&k).await? else {
            continue;
        };
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(m) if m.expires_at > now => out.push(m),
            Ok(_) => {}
            Err(e) => tracing::warn!(key = k, error = %e, "unreadable recording manifest skipped"),
        }
    }
    out.sort_by_key(|m| std::cmp::Reverse(m.started_at));
    Ok(out)
}

/// Deletes every recording whose expiry is before `now`: the second line
/// of defence behind an S3 lifecycle rule, and the only one for a local
/// directory. Returns how many were deleted.
pub async fn sweep(store: &dyn Store, now: DateTime<Utc>) -> Result<usize, StoreError> {
    let keys = store.list(PREFIX).await?;
    let mut deleted = 0;
    for manifest_key in keys.iter().filter(|k| k.ends_with(&format!("/{MANIFEST}"))) {
        let Some(bytes) = store.get_bytes(manifest_key).await? else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
            continue;
        };
        if m.expires_at > now {
            continue;
        }
        let dir = manifest_key.trim_end_matches(MANIFEST);
        // Media first, manifest last: a sweep cut short is redone next time.
        for k in keys
            .iter()
            .filter(|k| k.starts_with(dir) && *k != manifest_key)
        {
            store.delete(k).await?;
        }
        store.delete(manifest_key).await?;
        tracing::info!(room = %m.room, recording = %m.id, "expired recording deleted");
        deleted += 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn manifest(room: &str, id: &str, expires_at: DateTime<Utc>) -> Manifest {
        Manifest {
            id: id.into(),
            room: room.into(),
            title: "t".into(),
            started_at: expires_at - Duration::days(30),
            ended_at: expires_at - Duration::days(30),
            duration_ms: 1000,
            participants: vec![],
            size: 3,
            expires_at,
            content_type: "video/webm".into(),
        }
    }

    #[tokio::test]
    async fn list_skips_expired_and_sweep_deletes_them() {
        let root =
            std::env::temp_dir().join(format!("confer-store-{:016x}", rand::random::<u64>()));
        let store = LocalStore::new(root.clone());
        let now = Utc::now();
        for (id, expires) in [
            ("old", now - Duration::hours(1)),
            ("new", now + Duration::days(29)),
        ] {
            store
                .put_bytes(&key("r1", id, MEDIA), b"abc".to_vec())
                .await
                .unwrap();
            let m = serde_json::to_vec(&manifest("r1", id, expires)).unwrap();
            store.put_bytes(&key("r1", id, MANIFEST), m).await.unwrap();
        }
        store
            .put_bytes(&key("r2", "x", MEDIA), b"x".to_vec())
            .await
            .unwrap();
        let listed = list_recordings(&store, "r1", now).await.unwrap();
        assert_eq!(
            listed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["new"]
        );
        assert_eq!(store.list("recordings/r1/").await.unwrap().len(), 4);

        assert_eq!(sweep(&store, now).await.unwrap(), 1);
        assert_eq!(
            store.list("recordings/r1/").await.unwrap(),
            [
                "recordings/r1/new/manifest.json",
                "recordings/r1/new/recording.webm"
            ]
        );
        assert!(
            !root.join("recordings/r1/old").exists(),
            "empty directories are removed"
        );
        // The clock moves on 30 days: the rest goes too.
        assert_eq!(sweep(&store, now + Duration::days(30)).await.unwrap(), 1);
        assert!(store.list("recordings/r1/").await.unwrap().is_empty());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn keys_cannot_leave_the_root() {
        let store = LocalStore::new(std::env::temp_dir().join("confer-store-never"));
        for bad in ["../etc/passwd", "/etc/passwd", "a//b", "a/./b", ""] {
            assert!(
                matches!(store.get_bytes(bad).await, Err(StoreError::BadKey(_))),
                "{bad}"
            );
        }
    }
}
