//! Recording meetings: started and stopped by moderators, one at a time
//! per room, stopped when the room closes; finished recordings listed and
//! downloaded through links Confer signs for a few minutes.

use crate::media::{Announcement, Media};
use crate::webhook::Webhooks;
use chrono::Utc;
use confer_recorder::recording::Settings;
use confer_recorder::s3::{S3Settings, S3Store};
use confer_recorder::store::{self, Download, Manifest, Store};
use confer_recorder::{LocalStore, Running};
use confer_sfu::RecordingState;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// How long a download link works.
pub const LINK_SECS: i64 = 10 * 60;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RecordingError {
    #[error("recording is turned off on this server")]
    Disabled,
    #[error("this meeting is already being recorded")]
    AlreadyRecording,
    #[error("this meeting is not being recorded")]
    NotRecording,
    #[error("no such room")]
    NoRoom,
    #[error("no recorder is available: none is connected, or all are at capacity")]
    NoRecorder,
    #[error(
        "the server's recording spool is full ({used_mb} MB of {max_mb} MB): \
         recordings waiting for storage must be stored first"
    )]
    SpoolFull { used_mb: u64, max_mb: u64 },
}

/// How a recording is made and kept here, from `[recording]`.
pub fn recorder_settings(config: &crate::Config) -> Settings {
    let r = &config.recording;
    Settings {
        segment: Duration::from_secs(r.segment_seconds.into()),
        // S3 is another machine: segments go there as they complete.
        upload_segments: r.store == crate::config::StoreKind::S3,
        keep: chrono::Duration::days(r.keep_days.into()),
        spool: r
            .spool_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("spool")),
        ..Settings::default()
    }
}

/// The store `[recording]` names; the same again as S3, for its lifecycle rule.
pub fn open_store(config: &crate::Config) -> (Arc<dyn Store>, Option<Arc<S3Store>>) {
    let r = &config.recording;
    match r.store {
        crate::config::StoreKind::Local => {
            let dir = r
                .local_dir
                .clone()
                .unwrap_or_else(|| config.data_dir.join("recordings"));
            (Arc::new(LocalStore::new(dir)), None)
        }
        crate::config::StoreKind::S3 => {
            let c = &r.s3;
            let s3 = Arc::new(S3Store::new(&S3Settings {
                endpoint: c.endpoint.clone(),
                region: c.region.clone(),
                bucket: c.bucket.clone().unwrap_or_default(),
                access_key_id: c.access_key_id.clone().unwrap_or_default(),
                secret_access_key: c.secret_access_key.clone().unwrap_or_default(),
                path_style: c.path_style,
            }));
            (s3.clone() as Arc<dyn Store>, Some(s3))
        }
    }
}

/// How often the spool's size is checked while recording.
const SPOOL_CHECK: Duration = Duration::from_secs(2);
const SPOOL_FULL: &str = "the server's recording spool is full";
const RECORDING_ENDED: &str = "the recorder stopped";

pub struct Recordings {
    pub store: Arc<dyn Store>,
    /// The same store when it is S3, for its lifecycle rule.
    s3: Option<Arc<S3Store>>,
    keep_days: u32,
    settings: Settings,
    enabled: bool,
    media: Media,
    webhooks: Option<Arc<Webhooks>>,
    running: Mutex<HashMap<String, Running>>,
    /// Bytes the spool may hold; 0: no bound.
    spool_max: u64,
    /// Signs download links.
    link_key: Vec<u8>,
    /// With `recording.recorders = "remote"`: the recorder processes that
    /// record instead of this one.
    pub remote: Option<Arc<crate::recorders::Recorders>>,
    /// Mints the tokens remote recorders join with.
    tokens: Arc<crate::token::Tokens>,
    /// Recordings remote recorders stored after they were lost.
    recovered: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Manifest>>>,
}

impl Recordings {
    pub fn new(
        config: &crate::Config,
        media: Media,
        webhooks: Option<Arc<Webhooks>>,
        tokens: Arc<crate::token::Tokens>,
    ) -> Arc<Recordings> {
        let r = &config.recording;
        let settings = recorder_settings(config);
        // Links must verify on every node of a cluster: derive the key from
        // the shared token secret when there is one.
        let link_key = match &config.auth.token_secret {
            Some(s) => {
                let mut mac = Hmac::<Sha256>::new_from_slice(s.as_bytes()).expect("any key");
                mac.update(b"confer recording links");
                mac.finalize().into_bytes().to_vec()
            }
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let (store, s3) = open_store(config);
        let (recovered_tx, recovered) = tokio::sync::mpsc::unbounded_channel();
        let remote = (r.recorders == crate::config::RecorderMode::Remote)
            .then(|| Arc::new(crate::recorders::Recorders::new(recovered_tx)));
        Arc::new(Recordings {
            store,
            s3,
            keep_days: r.keep_days,
            settings,
            enabled: r.enabled,
            spool_max: r.spool_max_mb * 1_000_000,
            media,
            webhooks,
            running: Mutex::new(HashMap::new()),
            link_key,
            remote,
            tokens,
            recovered: Mutex::new(Some(recovered)),
        })
    }

    /// Installs the S3 lifecycle rule, finishes recordings an earlier
    /// process left, then every minute stores recordings that could not be
    /// stored yet, and every `interval` sweeps expired ones. Runs for the
    /// life of the process.
    pub async fn maintain(self: Arc<Self>, interval: Duration) {
        if let Some(s3) = &self.s3 {
            match s3.ensure_lifecycle(self.keep_days).await {
                Ok(what) => info!("S3 lifecycle rule in place: {what}"),
                Err(e) => warn!(
                    error = %e,
                    "could not install the S3 lifecycle rule (do the credentials allow PutLifecycleConfiguration?); \
                     expired recordings are still deleted by Confer's own sweep"
                ),
            }
        }
        let spool = self.settings.spool.clone();
        for m in
            confer_recorder::recover(&spool, self.store.as_ref(), self.settings.keep, false).await
        {
            self.available(&m);
        }
        self.recover_orphans().await;
        let mut recovered = self
            .recovered
            .lock()
            .unwrap()
            .take()
            .expect("maintained once");
        let mut sweep = tokio::time::interval(interval);
        let mut retry = tokio::time::interval(Duration::from_secs(60));
        let mut spool_check = tokio::time::interval(SPOOL_CHECK);
        loop {
            tokio::select! {
                Some(m) = recovered.recv() => {
                    // Announced only once the store lists it: the room is
                    // told of what its members can download.
                    match self.list(&m.room).await {
                        Ok(list) if list.iter().any(|l| l.id == m.id) => self.available(&m),
                        Ok(_) => warn!(recording = %m.id, "a recorder reported a recording the store does not list"),
                        Err(e) => warn!(recording = %m.id, error = %e, "could not check a recovered recording"),
                    }
                }
                _ = spool_check.tick() => {
                    self.stop_all_if_spool_full();
                    self.stop_ended();
                }
                _ = sweep.tick() => match store::sweep(self.store.as_ref(), Utc::now()).await {
                    Ok(0) => {}
                    Ok(n) => info!(deleted = n, "expired recordings deleted"),
                    Err(e) => warn!(error = %e, "expiry sweep failed; next time"),
                },
                _ = retry.tick() => {
                    for m in confer_recorder::recover(&spool, self.store.as_ref(), self.settings.keep, true).await {
                        self.available(&m);
                    }
                    self.recover_orphans().await;
                }
            }
        }
    }

    /// Finishes recordings whose recorder (another node, or this one before
    /// its machine was replaced) is gone, from their uploaded segments.
    async fn recover_orphans(&self) {
        if !self.settings.upload_segments {
            return;
        }
        let (spool, keep) = (&self.settings.spool, self.settings.keep);
        match confer_recorder::recover_orphans(spool, self.store.as_ref(), keep, Utc::now()).await {
            Ok(done) => done.iter().for_each(|m| self.available(m)),
            Err(e) => warn!(error = %e, "could not look for orphaned recordings; next time"),
        }
    }

    /// The spool's size, when it has reached its bound.
    fn spool_full(&self) -> Option<u64> {
        if self.spool_max == 0 {
            return None;
        }
        let used = confer_recorder::spool_bytes(&self.settings.spool);
        (used >= self.spool_max).then_some(used)
    }

    /// A full spool (the store unreachable for long, or the disk budget
    /// spent) stops every recording: what they hold so far is kept and
    /// stored, rather than the disk filling up under all of them.
    fn stop_all_if_spool_full(self: &Arc<Self>) {
        let rooms: Vec<String> = self.running.lock().unwrap().keys().cloned().collect();
        if rooms.is_empty() || self.spool_full().is_none() {
            return;
        }
        warn!(
            max_bytes = self.spool_max,
            "recording spool full; stopping {} recording(s)",
            rooms.len()
        );
        for room in rooms {
            let _ = self.stop_because(&room, SPOOL_FULL, Some(SPOOL_FULL));
        }
    }

    /// Recordings that ended without being stopped (their recorder was
    /// lost, or failed) are stopped here, so that the room is told.
    fn stop_ended(self: &Arc<Self>) {
        let ended: Vec<String> = {
            let running = self.running.lock().unwrap();
            running
                .iter()
                .filter(|(_, r)| r.is_finished())
                .map(|(room, _)| room.clone())
                .collect()
        };
        for room in ended {
            let _ = self.stop_because(&room, RECORDING_ENDED, Some(RECORDING_ENDED));
        }
    }

    pub fn is_recording(&self, room: &str) -> bool {
        self.running.lock().unwrap().contains_key(room)
    }

    pub fn start(&self, room_id: &str, title: &str, by: &str) -> Result<String, RecordingError> {
        if !self.enabled {
            return Err(RecordingError::Disabled);
        }
        if !self.media.has_room(room_id) {
            return Err(RecordingError::NoRoom);
        }
        let mut running = self.running.lock().unwrap();
        if running.contains_key(room_id) {
            return Err(RecordingError::AlreadyRecording);
        }
        if let Some(used) = self.spool_full() {
            return Err(RecordingError::SpoolFull {
                used_mb: used / 1_000_000,
                max_mb: self.spool_max / 1_000_000,
            });
        }
        let r = match &self.remote {
            None => confer_recorder::start(
                // Embedded recorders run only beside a local SFU (checked
                // at start-up).
                self.media
                    .local_room(room_id)
                    .ok_or(RecordingError::NoRoom)?,
                title.to_owned(),
                self.store.clone(),
                self.settings.clone(),
            ),
            Some(remote) => {
                let id = confer_recorder::recording::new_id();
                let token = self.tokens.mint_recorder(room_id);
                remote
                    .dispatch(&id, room_id, title, token)
                    .ok_or(RecordingError::NoRecorder)?
            }
        };
        let id = r.id.clone();
        running.insert(room_id.to_owned(), r);
        drop(running);
        info!(room = room_id, recording = %id, by, "recording started");
        self.announce(room_id, RecordingState::Started, &id, None);
        self.hook(
            room_id,
            "recording.started",
            json!({ "recording_id": id, "by": by }),
        );
        Ok(id)
    }

    /// Stops the room's recording; the file is stored in the background and
    /// announced (`available`) when it is.
    pub fn stop(self: &Arc<Self>, room_id: &str, reason: &str) -> Result<String, RecordingError> {
        self.stop_because(room_id, reason, None)
    }

    /// Stops every recording in progress and waits until each is stored
    /// (or has failed), so that a server shutting down leaves nothing for
    /// the next start to recover. Returns how many there were.
    pub async fn finish_all(self: &Arc<Self>, reason: &str) -> usize {
        let rooms: Vec<String> = self.running.lock().unwrap().keys().cloned().collect();
        let storing: Vec<_> = rooms
            .iter()
            .filter_map(|room| self.stop_storing(room, reason, Some(reason)).ok())
            .collect();
        let count = storing.len();
        for (_, task) in storing {
            let _ = task.await;
        }
        count
    }

    /// As [`Self::stop`]; `told` is the reason the room is given, if any.
    fn stop_because(
        self: &Arc<Self>,
        room_id: &str,
        reason: &str,
        told: Option<&str>,
    ) -> Result<String, RecordingError> {
        self.stop_storing(room_id, reason, told).map(|(id, _)| id)
    }

    /// Stops the room's recording; the task that stores it.
    fn stop_storing(
        self: &Arc<Self>,
        room_id: &str,
        reason: &str,
        told: Option<&str>,
    ) -> Result<(String, tokio::task::JoinHandle<()>), RecordingError> {
        let r = self
            .running
            .lock()
            .unwrap()
            .remove(room_id)
            .ok_or(RecordingError::NotRecording)?;
        let id = r.id.clone();
        info!(room = room_id, recording = %id, reason, "recording stopped");
        self.announce(room_id, RecordingState::Stopped, &id, told);
        self.hook(
            room_id,
            "recording.stopped",
            json!({ "recording_id": id, "reason": reason }),
        );
        let me = self.clone();
        let room_id = room_id.to_owned();
        let recording_id = id.clone();
        let task = tokio::spawn(async move {
            match r.stop().await {
                Ok(m) => me.available(&m),
                Err(e) => {
                    warn!(room = %room_id, error = %e, "recording could not be stored");
                    let reason = e.to_string();
                    me.announce(
                        &room_id,
                        RecordingState::Failed,
                        &recording_id,
                        Some(&reason),
                    );
                }
            }
        });
        Ok((id, task))
    }

    fn announce(&self, room: &str, state: RecordingState, id: &str, reason: Option<&str>) {
        self.media.announce(
            room,
            Announcement::Recording {
                state,
                recording_id: id.to_owned(),
                reason: reason.map(str::to_owned),
            },
        );
    }

    fn available(&self, m: &Manifest) {
        self.announce(&m.room, RecordingState::Available, &m.id, None);
        self.hook(
            &m.room,
            "recording.available",
            json!({
                "recording_id": m.id,
                "title": m.title,
                "started_at": m.started_at,
                "duration_ms": m.duration_ms,
                "size": m.size,
                "expires_at": m.expires_at,
            }),
        );
    }

    fn hook(&self, room: &str, kind: &'static str, data: serde_json::Value) {
        if let Some(w) = &self.webhooks {
            w.send(room, kind, data);
        }
    }

    fn link_sig(&self, room: &str, id: &str, expires: i64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.link_key).expect("any key");
        mac.update(format!("{room}/{id}/{expires}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// A download link for a recording, valid [`LINK_SECS`].
    pub fn link(&self, room: &str, id: &str) -> String {
        let expires = Utc::now().timestamp() + LINK_SECS;
        format!(
            "/api/rooms/{room}/recordings/{id}/file?expires={expires}&sig={}",
            self.link_sig(room, id, expires)
        )
    }

    pub fn link_valid(&self, room: &str, id: &str, expires: i64, sig: &str) -> bool {
        if expires < Utc::now().timestamp() {
            return false;
        }
        let Ok(given) = hex::decode(sig) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.link_key).expect("any key");
        mac.update(format!("{room}/{id}/{expires}").as_bytes());
        mac.verify_slice(&given).is_ok()
    }

    pub async fn list(&self, room: &str) -> Result<Vec<Manifest>, store::StoreError> {
        store::list_recordings(self.store.as_ref(), room, Utc::now()).await
    }

    /// Where the bytes of a listed, unexpired recording are.
    pub async fn download(
        &self,
        room: &str,
        id: &str,
    ) -> Result<Option<(Manifest, Download)>, store::StoreError> {
        let Some(m) = self.list(room).await?.into_iter().find(|m| m.id == id) else {
            return Ok(None);
        };
        let filename = format!("{}-{}.webm", room, m.started_at.format("%Y%m%d-%H%M"));
        let d = self
            .store
            .download(&store::key(room, id, store::MEDIA), &filename)
            .await?;
        Ok(Some((m, d)))
    }
}
