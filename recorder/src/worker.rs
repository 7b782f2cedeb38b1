//! `confer recorder`: a process that records meetings for a signaling
//! server elsewhere, so that recording load sits on machines of its own.
//!
//! It keeps one WebSocket open to signaling (`GET /api/recorders`, the
//! recorder secret as a bearer token; `docs/recording.md`), is sent
//! `record` and `stop`, joins rooms as a hidden WebRTC participant
//! ([`crate::participant`]), and stores what it records in the store it
//! shares with signaling, answering `stored` or `failed`. Answers wait in
//! a queue while signaling is unreachable, and the connection is made
//! again with back-off; a recording whose room closes meanwhile is stored
//! all the same.

use crate::recording::{self, RecordError, Running, Settings};
use crate::store::Manifest;
use crate::store::Store;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Signaling's base URL, e.g. `http://10.0.0.5:8080`.
    pub signaling: String,
    /// `recording.recorder_secret`, the same on both sides.
    pub secret: String,
    /// Shown in signaling's logs.
    pub name: String,
    /// Most recordings at once.
    pub capacity: u32,
    /// Address the WebRTC sockets bind, reachable from the SFU.
    pub bind: IpAddr,
}

/// What signaling sends a recorder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToRecorder {
    /// Join `room` with `token` (valid a minute) and record it as `recording_id`.
    Record {
        recording_id: String,
        room: String,
        title: String,
        token: String,
    },
    /// Stop, store, then answer.
    Stop { recording_id: String },
}

/// What a recorder sends signaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromRecorder {
    /// First, once connected.
    Hello {
        name: String,
        capacity: u32,
    },
    /// The recording is in the store; also sent, unasked, for one the
    /// recorder stored after it had been lost.
    Stored {
        recording_id: String,
        manifest: Manifest,
    },
    Failed {
        recording_id: String,
        error: String,
    },
}

/// One recording this process holds.
enum Slot {
    /// Joining the room; `true` once a `stop` came meanwhile.
    Joining(bool),
    Recording(Running),
}

struct Worker {
    settings: WorkerSettings,
    store: Arc<dyn Store>,
    recording: Settings,
    slots: Mutex<HashMap<String, Slot>>,
    /// Recordings stopped and being stored, not yet answered.
    storing: AtomicUsize,
    /// Shutting down: no new recordings; those in progress are stored.
    stopping: AtomicBool,
    /// Answers for signaling, kept across reconnections.
    answers: mpsc::UnboundedSender<FromRecorder>,
}

/// How long a shutdown waits for recordings to be stored: below the 30 s
/// that Kubernetes and systemd wait before killing.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Connects, serves, connects again, until `shutdown` turns true; then
/// stops the recordings in progress and returns once they are stored and
/// answered (or after [`SHUTDOWN_GRACE`]; the next start stores the rest).
pub async fn run(
    settings: WorkerSettings,
    store: Arc<dyn Store>,
    recording: Settings,
    mut shutdown: watch::Receiver<bool>,
) {
    // A recorder killed mid-recording left segments: they become files now,
    // and signaling is told as for any other.
    let (answers, mut queued) = mpsc::unbounded_channel();
    for m in recording::recover(&recording.spool, store.as_ref(), recording.keep, false).await {
        info!(room = %m.room, recording = %m.id, "stored a recording left by an earlier run");
        let _ = answers.send(FromRecorder::Stored {
            recording_id: m.id.clone(),
            manifest: m,
        });
    }
    let worker = Arc::new(Worker {
        settings,
        store,
        recording,
        slots: Mutex::default(),
        storing: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        answers,
    });
    let mut delay = Duration::from_secs(1);
    loop {
        match worker.clone().serve(&mut queued, &mut shutdown).await {
            Ok(()) if worker.stopping.load(Ordering::Relaxed) => {}
            Ok(()) => {
                warn!("signaling closed the recorder connection");
                delay = Duration::from_secs(1);
            }
            Err(e) => warn!("recorder connection: {e}"),
        }
        if worker.stopping.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => worker.stop_all(),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while !worker.idle() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info!(stored_all = worker.idle(), "recorder stopped");
}

impl Worker {
    /// Nothing recording, nothing left to store.
    fn idle(&self) -> bool {
        self.slots.lock().unwrap().is_empty() && self.storing.load(Ordering::Relaxed) == 0
    }

    /// Shutting down: every recording is stopped and stored.
    fn stop_all(self: &Arc<Self>) {
        self.stopping.store(true, Ordering::Relaxed);
        let ids: Vec<String> = self.slots.lock().unwrap().keys().cloned().collect();
        info!(
            recordings = ids.len(),
            "shutting down: storing recordings in progress"
        );
        for id in ids {
            self.stop(id);
        }
    }

    /// Serves one connection; returns when it closes, or once shutting
    /// down has stored and answered everything.
    async fn serve(
        self: Arc<Self>,
        queued: &mut mpsc::UnboundedReceiver<FromRecorder>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let base = self.settings.signaling.trim_end_matches('/');
        let url = format!("{}/api/recorders", base.replacen("http", "ws", 1));
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let auth = format!("Bearer {}", self.settings.secret);
        request.headers_mut().insert(
            "authorization",
            auth.parse()
                .map_err(|_| "recorder_secret: not a valid header value")?,
        );
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let (mut sink, mut stream) = socket.split();
        let hello = FromRecorder::Hello {
            name: self.settings.name.clone(),
            capacity: self.settings.capacity,
        };
        let send =
            |m: &FromRecorder| Message::Text(serde_json::to_string(m).expect("serialises").into());
        sink.send(send(&hello)).await.map_err(|e| e.to_string())?;
        info!(%url, "connected to signaling; waiting for recordings");
        let mut check = tokio::time::interval(Duration::from_millis(100));
        loop {
            let stopping = self.stopping.load(Ordering::Relaxed);
            if stopping && self.idle() && queued.is_empty() {
                return Ok(());
            }
            tokio::select! {
                _ = shutdown.changed(), if !stopping => self.stop_all(),
                _ = check.tick(), if stopping => {}
                answer = queued.recv() => {
                    let Some(answer) = answer else { return Ok(()) };
                    if let Err(e) = sink.send(send(&answer)).await {
                        // Sent again on the next connection.
                        let _ = self.answers.send(answer);
                        return Err(e.to_string());
                    }
                }
                msg = stream.next() => match msg {
                    Some(Ok(Message::Text(text))) => self.on_message(text.as_str()),
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.to_string()),
                },
            }
        }
    }

    fn on_message(self: &Arc<Self>, text: &str) {
        let msg = match serde_json::from_str::<ToRecorder>(text) {
            Ok(m) => m,
            Err(e) => return warn!("signaling sent a recorder message not understood: {e}"),
        };
        match msg {
            ToRecorder::Record {
                recording_id: id,
                room,
                title,
                token,
            } => {
                if self.stopping.load(Ordering::Relaxed) {
                    return self.fail(&id, "the recorder is shutting down");
                }
                let mut slots = self.slots.lock().unwrap();
                if slots.len() >= self.settings.capacity as usize {
                    drop(slots);
                    return self.fail(&id, "the recorder is at capacity");
                }
                slots.insert(id.clone(), Slot::Joining(false));
                drop(slots);
                let me = self.clone();
                tokio::spawn(async move { me.record(id, room, title, token).await });
            }
            ToRecorder::Stop { recording_id } => self.stop(recording_id),
        }
    }

    /// Stops a recording; one still joining stops as soon as it has joined.
    fn stop(self: &Arc<Self>, id: String) {
        let mut slots = self.slots.lock().unwrap();
        match slots.get_mut(&id) {
            Some(Slot::Joining(stop)) => *stop = true,
            Some(Slot::Recording(_)) => {
                if let Some(Slot::Recording(r)) = slots.remove(&id) {
                    drop(slots);
                    self.finish(id, r);
                }
            }
            None => {}
        }
    }

    /// Stores a stopped recording and answers.
    fn finish(self: &Arc<Self>, id: String, running: Running) {
        self.storing.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            me.store_answer(id, running.stop().await);
            me.storing.fetch_sub(1, Ordering::Relaxed);
        });
    }

    async fn record(self: Arc<Self>, id: String, room: String, title: String, token: String) {
        let base = self.settings.signaling.clone();
        let feed = match crate::participant::join(&base, &room, &token, self.settings.bind).await {
            Ok(feed) => feed,
            Err(e) => {
                self.slots.lock().unwrap().remove(&id);
                return self.fail(&id, &e.to_string());
            }
        };
        info!(%room, recording = %id, "recording as a participant");
        let running = recording::start_feed(
            feed,
            id.clone(),
            title,
            self.store.clone(),
            self.recording.clone(),
        );
        let mut slots = self.slots.lock().unwrap();
        if matches!(slots.get(&id), Some(Slot::Joining(true))) {
            slots.remove(&id);
            drop(slots);
            return self.finish(id, running);
        }
        slots.insert(id, Slot::Recording(running));
    }

    fn store_answer(&self, id: String, result: Result<Manifest, RecordError>) {
        match result {
            Ok(manifest) => {
                let _ = self.answers.send(FromRecorder::Stored {
                    recording_id: id,
                    manifest,
                });
            }
            Err(e) => self.fail(&id, &e.to_string()),
        }
    }

    fn fail(&self, id: &str, error: &str) {
        warn!(recording = id, error, "recording failed");
        let _ = self.answers.send(FromRecorder::Failed {
            recording_id: id.to_owned(),
            error: error.to_owned(),
        });
    }
}
