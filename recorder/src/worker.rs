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
use crate::store::Store;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
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
    /// Answers for signaling, kept across reconnections.
    answers: mpsc::UnboundedSender<Value>,
}

/// Runs until the process ends: connects, serves, connects again.
pub async fn run(settings: WorkerSettings, store: Arc<dyn Store>, recording: Settings) {
    // A recorder killed mid-recording left segments: they become files now.
    for m in recording::recover(&recording.spool, store.as_ref(), recording.keep, false).await {
        info!(room = %m.room, recording = %m.id, "stored a recording left by an earlier run");
    }
    let (answers, mut queued) = mpsc::unbounded_channel();
    let worker = Arc::new(Worker {
        settings,
        store,
        recording,
        slots: Mutex::default(),
        answers,
    });
    let mut delay = Duration::from_secs(1);
    loop {
        match worker.clone().serve(&mut queued).await {
            Ok(()) => {
                warn!("signaling closed the recorder connection");
                delay = Duration::from_secs(1);
            }
            Err(e) => warn!("recorder connection: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

impl Worker {
    async fn serve(
        self: Arc<Self>,
        queued: &mut mpsc::UnboundedReceiver<Value>,
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
        let hello = json!({
            "type": "hello",
            "name": self.settings.name,
            "capacity": self.settings.capacity,
        });
        let send = |v: Value| Message::Text(v.to_string().into());
        sink.send(send(hello)).await.map_err(|e| e.to_string())?;
        info!(%url, "connected to signaling; waiting for recordings");
        loop {
            tokio::select! {
                answer = queued.recv() => {
                    let Some(answer) = answer else { return Ok(()) };
                    if let Err(e) = sink.send(send(answer.clone())).await {
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
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return warn!("signaling sent a recorder message that is not JSON");
        };
        let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let id = field("recording_id");
        match v["type"].as_str() {
            Some("record") => {
                let mut slots = self.slots.lock().unwrap();
                if slots.len() >= self.settings.capacity as usize {
                    drop(slots);
                    return self.fail(&id, "the recorder is at capacity");
                }
                slots.insert(id.clone(), Slot::Joining(false));
                drop(slots);
                let me = self.clone();
                let (room, title, token) = (field("room"), field("title"), field("token"));
                tokio::spawn(async move { me.record(id, room, title, token).await });
            }
            Some("stop") => {
                let slot = {
                    let mut slots = self.slots.lock().unwrap();
                    match slots.get_mut(&id) {
                        Some(Slot::Joining(stop)) => {
                            *stop = true;
                            None
                        }
                        Some(Slot::Recording(_)) => slots.remove(&id),
                        None => None,
                    }
                };
                if let Some(Slot::Recording(r)) = slot {
                    let me = self.clone();
                    tokio::spawn(async move { me.store_answer(id, r.stop().await) });
                }
            }
            other => warn!(?other, "unknown recorder message from signaling"),
        }
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
        let stop_now = {
            let mut slots = self.slots.lock().unwrap();
            let stop_now = matches!(slots.get(&id), Some(Slot::Joining(true)));
            if !stop_now {
                slots.insert(id.clone(), Slot::Recording(running));
                return;
            }
            slots.remove(&id);
            running
        };
        self.store_answer(id, stop_now.stop().await);
    }

    fn store_answer(&self, id: String, result: Result<crate::Manifest, RecordError>) {
        match result {
            Ok(m) => {
                let _ = self.answers.send(json!({
                    "type": "stored", "recording_id": id, "manifest": m,
                }));
            }
            Err(e) => self.fail(&id, &e.to_string()),
        }
    }

    fn fail(&self, id: &str, error: &str) {
        warn!(recording = id, error, "recording failed");
        let _ = self.answers.send(json!({
            "type": "failed", "recording_id": id, "error": error,
        }));
    }
}
