//! Recorder processes on other machines (`confer recorder`), with
//! `recording.recorders = "remote"`. Each keeps a WebSocket open here
//! (`GET /api/recorders`, `docs/recording.md`); a recording is given to the
//! one with the fewest in progress, which joins the room as a hidden
//! participant and answers `stored` (with the manifest) or `failed`.

use axum::extract::ws::{Message, WebSocket};
use confer_recorder::Manifest;
use confer_recorder::recording::{RecordError, Running};
use confer_recorder::worker::{FromRecorder, ToRecorder};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// How long a stopped recording may take to be stored by its recorder.
const STORE_WAIT: Duration = Duration::from_secs(120);

type Answer = Result<Manifest, String>;

/// A connected recorder as the admin API shows it.
#[derive(Debug, serde::Serialize)]
pub struct RecorderStatus {
    pub name: String,
    pub capacity: usize,
    /// Recordings it holds: in progress, or stopped and being stored.
    pub recordings: Vec<String>,
}

struct Connected {
    name: String,
    capacity: usize,
    tx: mpsc::UnboundedSender<ToRecorder>,
    /// Recordings it holds, each waiting for its answer.
    holding: HashMap<String, oneshot::Sender<Answer>>,
}

pub struct Recorders {
    connected: Mutex<HashMap<u64, Connected>>,
    next: AtomicU64,
    /// Recordings stored that no one here waits for: those a recorder
    /// finished after it was lost (restarted, it stores what it left).
    recovered: mpsc::UnboundedSender<Manifest>,
}

impl Recorders {
    pub fn new(recovered: mpsc::UnboundedSender<Manifest>) -> Recorders {
        Recorders {
            connected: Mutex::default(),
            next: AtomicU64::new(0),
            recovered,
        }
    }

    /// Recorders connected now.
    pub fn count(&self) -> usize {
        self.connected.lock().unwrap().len()
    }

    /// Each connected recorder and the recordings it holds, for the admin API.
    pub fn status(&self) -> Vec<RecorderStatus> {
        let connected = self.connected.lock().unwrap();
        let mut all: Vec<_> = connected
            .values()
            .map(|c| {
                let mut recordings: Vec<String> = c.holding.keys().cloned().collect();
                recordings.sort();
                RecorderStatus {
                    name: c.name.clone(),
                    capacity: c.capacity,
                    recordings,
                }
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Serves one recorder's connection until it closes. Its recordings
    /// in progress then fail here; it stores them all the same.
    pub async fn serve(self: Arc<Self>, socket: WebSocket) {
        let (mut sink, mut stream) = socket.split();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel::<ToRecorder>();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let text = serde_json::to_string(&m).expect("serialises");
                if sink.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
        });
        let mut tx = Some(tx);
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(text) = msg else { continue };
            let msg = match serde_json::from_str::<FromRecorder>(text.as_str()) {
                Ok(m) => m,
                Err(e) => {
                    warn!(recorder = id, "recorder message not understood: {e}");
                    continue;
                }
            };
            match msg {
                FromRecorder::Hello { name, capacity } => {
                    let Some(tx) = tx.take() else { continue };
                    let capacity = capacity.clamp(1, 1000) as usize;
                    let name: String = name.chars().take(100).collect();
                    info!(recorder = id, %name, capacity, "recorder connected");
                    self.connected.lock().unwrap().insert(
                        id,
                        Connected {
                            name,
                            capacity,
                            tx,
                            holding: HashMap::new(),
                        },
                    );
                }
                FromRecorder::Stored {
                    recording_id,
                    manifest,
                } => self.answer(id, &recording_id, Ok(manifest)),
                FromRecorder::Failed {
                    recording_id,
                    error,
                } => self.answer(id, &recording_id, Err(error)),
            }
        }
        if let Some(c) = self.connected.lock().unwrap().remove(&id) {
            warn!(
                recorder = id,
                name = %c.name,
                recordings = c.holding.len(),
                "recorder disconnected"
            );
        }
    }

    fn answer(&self, recorder: u64, recording: &str, answer: Answer) {
        let waiting = self
            .connected
            .lock()
            .unwrap()
            .get_mut(&recorder)
            .and_then(|c| c.holding.remove(recording));
        match (waiting, answer) {
            (Some(w), answer) => {
                let _ = w.send(answer);
            }
            (None, Ok(m)) => {
                info!(
                    recording,
                    "a recorder stored a recording it had been recording when lost"
                );
                let _ = self.recovered.send(m);
            }
            (None, Err(e)) => warn!(recorder, recording, error = %e, "a recording not held failed"),
        }
    }

    /// Hands recording `id` of `room` to the least busy recorder; `None`
    /// when none is connected with room to spare. `token` admits it.
    pub fn dispatch(&self, id: &str, room: &str, title: &str, token: String) -> Option<Running> {
        let (answer_tx, mut answer) = oneshot::channel();
        let tx = {
            let mut connected = self.connected.lock().unwrap();
            let (_, c) = connected
                .iter_mut()
                .filter(|(_, c)| c.holding.len() < c.capacity && !c.tx.is_closed())
                .min_by_key(|(k, c)| (c.holding.len(), **k))?;
            c.holding.insert(id.to_owned(), answer_tx);
            info!(room, recording = id, recorder = %c.name, "recording dispatched");
            c.tx.clone()
        };
        let _ = tx.send(ToRecorder::Record {
            recording_id: id.to_owned(),
            room: room.to_owned(),
            title: title.to_owned(),
            token,
        });
        let (stop, stop_rx) = oneshot::channel();
        let recording = id.to_owned();
        let lost = |_| {
            RecordError::Remote(
                "the recorder was lost; it stores what it recorded when it restarts".into(),
            )
        };
        let done = tokio::spawn(async move {
            let early = tokio::select! {
                _ = stop_rx => None,
                a = &mut answer => Some(a),
            };
            let answer = match early {
                Some(a) => a.map_err(lost)?,
                None => {
                    let _ = tx.send(ToRecorder::Stop {
                        recording_id: recording,
                    });
                    tokio::time::timeout(STORE_WAIT, answer)
                        .await
                        .map_err(|_| {
                            RecordError::Remote(format!("not stored within {STORE_WAIT:?}"))
                        })?
                        .map_err(lost)?
                }
            };
            answer.map_err(RecordError::Remote)
        });
        Some(Running::elsewhere(id.to_owned(), stop, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_messages_are_the_protocol() {
        let text = crate::doc_examples::marked("recording.md", "recorder-messages");
        let (mut to, mut from) = (Vec::new(), Vec::new());
        for line in text.lines() {
            match (
                serde_json::from_str::<ToRecorder>(line),
                serde_json::from_str::<FromRecorder>(line),
            ) {
                (Ok(m), _) => to.push(m),
                (_, Ok(m)) => from.push(m),
                (Err(a), Err(b)) => panic!("{line}\nneither direction: {a}; {b}"),
            }
        }
        assert!(matches!(
            to[..],
            [ToRecorder::Record { .. }, ToRecorder::Stop { .. }]
        ));
        assert!(matches!(
            from[..],
            [
                FromRecorder::Hello { .. },
                FromRecorder::Stored { .. },
                FromRecorder::Failed { .. }
            ]
        ));
        // A message of the wrong shape is refused, not half read.
        assert!(serde_json::from_str::<ToRecorder>(r#"{"type": "stop"}"#).is_err());
        assert!(
            serde_json::from_str::<ToRecorder>(
                r#"{"type": "stop", "recording_id": "x", "now": 1}"#
            )
            .is_err()
        );
    }
}
