//! Segments go to the store as they complete, so losing the recorder's
//! machine (not just its process) loses at most the segment in progress.
//!
//! Beside the parts lies `state.json`: the recording's state with a
//! heartbeat the recorder renews while it runs. When the heartbeat is old,
//! the recorder is gone, and any node finishes the recording from its parts
//! ([`recover_orphans`]). Everything lives under the recording's own
//! prefix, so the bucket's lifecycle rule also removes parts that nobody
//! finished. A finished recording's parts are deleted.

use crate::recording::{self, RecordError, State};
use crate::store::{self, Store};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The leaf of a recording's remote state, and the folder of its parts.
pub const STATE: &str = "state.json";
pub const PARTS: &str = "parts/";

/// How often a running recorder renews its heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// `state.json` in the store.
#[derive(Debug, Serialize, Deserialize)]
struct Remote {
    #[serde(flatten)]
    state: State,
    heartbeat_at: DateTime<Utc>,
    segment_ms: i64,
}

impl Remote {
    /// A recorder that has not renewed its heartbeat for this long is gone:
    /// several heartbeats, and several segments for long ones.
    fn orphaned_after(&self) -> chrono::Duration {
        chrono::Duration::seconds(120).max(chrono::Duration::milliseconds(3 * self.segment_ms))
    }
}

/// Uploads a running recording's segments in the background; dropping it
/// stops the uploads.
pub(crate) struct Uploader {
    tx: mpsc::UnboundedSender<(PathBuf, State)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Uploader {
    pub(crate) fn start(store: Arc<dyn Store>, state: State, segment: Duration) -> Uploader {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(upload(store, state, segment.as_millis() as i64, rx));
        Uploader { tx, task }
    }

    /// `segment` is complete; `state` is the recording's state as of now.
    pub(crate) fn segment_done(&self, segment: PathBuf, state: State) {
        let _ = self.tx.send((segment, state));
    }
}

async fn upload(
    store: Arc<dyn Store>,
    mut state: State,
    segment_ms: i64,
    mut rx: mpsc::UnboundedReceiver<(PathBuf, State)>,
) {
    let mut pending = VecDeque::new();
    let mut beat = tokio::time::interval(HEARTBEAT);
    let mut failing = false;
    loop {
        tokio::select! {
            done = rx.recv() => match done {
                Some((path, newer)) => {
                    pending.push_back(path);
                    state = newer;
                }
                None => return,
            },
            _ = beat.tick() => {}
        }
        // Oldest first, and retried at the next segment or heartbeat while
        // the store is down; the spool still holds every segment.
        let mut result = Ok(());
        while let Some(path) = pending.front() {
            let leaf = format!("{PARTS}{}", file_name(path));
            match store
                .put_file(&store::key(&state.room, &state.id, &leaf), path)
                .await
            {
                Ok(_) => {
                    pending.pop_front();
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = put_state(store.as_ref(), &state, segment_ms).await;
        }
        match &result {
            Err(e) if !failing => {
                warn!(recording = %state.id, error = %e, "segment upload failed; retrying")
            }
            Ok(()) if failing => info!(recording = %state.id, "segment uploads resumed"),
            _ => {}
        }
        failing = result.is_err();
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn put_state(
    store: &dyn Store,
    state: &State,
    segment_ms: i64,
) -> Result<(), store::StoreError> {
    let remote = Remote {
        state: state.clone(),
        heartbeat_at: Utc::now(),
        segment_ms,
    };
    store
        .put_bytes(
            &store::key(&state.room, &state.id, STATE),
            serde_json::to_vec(&remote).expect("state serialises"),
        )
        .await
}

/// Deletes a finished recording's parts and remote state, if any.
pub async fn clear(store: &dyn Store, room: &str, id: &str) -> Result<(), store::StoreError> {
    for k in store.list(&store::key(room, id, PARTS)).await? {
        store.delete(&k).await?;
    }
    store.delete(&store::key(room, id, STATE)).await
}

/// Finishes the recordings in the store whose recorder is gone (its
/// heartbeat older than it allows at `now`), from the parts it uploaded:
/// they are fetched into `spool` and finished there, so a crash half-way
/// leaves them to [`recording::recover`]. Recordings in `spool` are this
/// machine's and left alone.
pub async fn recover_orphans(
    spool: &Path,
    store: &dyn Store,
    keep: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<Vec<store::Manifest>, store::StoreError> {
    let keys = store.list(store::PREFIX).await?;
    let mut done = Vec::new();
    for state_key in keys.iter().filter(|k| k.ends_with(&format!("/{STATE}"))) {
        let Some(bytes) = store.get_bytes(state_key).await? else {
            continue;
        };
        let remote = match serde_json::from_slice::<Remote>(&bytes) {
            Ok(r) if is_name(&r.state.room) && is_name(&r.state.id) => r,
            Ok(_) => {
                warn!(
                    key = state_key,
                    "recording state with a bad room or id; left alone"
                );
                continue;
            }
            Err(e) => {
                warn!(key = state_key, error = %e, "unreadable recording state; left alone");
                continue;
            }
        };
        let (room, id) = (remote.state.room.clone(), remote.state.id.clone());
        if *state_key != store::key(&room, &id, STATE) {
            warn!(
                key = state_key,
                "recording state under another recording's key; left alone"
            );
            continue;
        }
        let dir = spool.join(&room).join(&id);
        if dir.exists() || now - remote.heartbeat_at < remote.orphaned_after() {
            continue;
        }
        if keys.contains(&store::key(&room, &id, store::MANIFEST)) {
            // Stored, but its parts were not all deleted.
            clear(store, &room, &id).await?;
            continue;
        }
        info!(room, recording = id, heartbeat_at = %remote.heartbeat_at,
            "finishing a recording whose recorder is gone, from its uploaded segments");
        // Claimed: other nodes now see a live heartbeat and leave it.
        put_state(store, &remote.state, remote.segment_ms).await?;
        let ended_at = remote.heartbeat_at;
        match fetch(store, &dir, &remote.state, &keys).await {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                warn!(recording = id, error = %e, "could not fetch its segments; next time");
                continue;
            }
        }
        match recording::finalize(&dir, remote.state, store, keep, ended_at).await {
            Ok(m) => done.push(m),
            Err(RecordError::Empty) => {
                warn!(recording = id, "no segment was uploaded; nothing to keep");
                clear(store, &room, &id).await?;
            }
            Err(e) => warn!(recording = id, error = %e, "could not finish it; next start"),
        }
    }
    Ok(done)
}

/// Downloads the parts into `dir`, as a stopped recording in the spool.
async fn fetch(
    store: &dyn Store,
    dir: &Path,
    state: &State,
    keys: &[String],
) -> Result<(), RecordError> {
    std::fs::create_dir_all(dir)?;
    recording::write_state(dir, state)?;
    let parts = store::key(&state.room, &state.id, PARTS);
    for k in keys.iter().filter(|k| k.starts_with(&parts)) {
        let leaf = &k[parts.len()..];
        if !recording::is_segment_name(leaf) {
            continue;
        }
        if let Some(bytes) = store.get_bytes(k).await? {
            std::fs::write(dir.join(leaf), bytes)?;
        }
    }
    recording::mark_stopped(dir)?;
    Ok(())
}

/// A room or recording id that is safe as one path component.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0'])
}
