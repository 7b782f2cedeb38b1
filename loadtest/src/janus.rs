//! The same participants against Janus's VideoRoom plugin, for comparison:
//! Janus's JSON API over its WebSocket transport, a publisher handle (which
//! also brings news of the room's other publishers) and one multistream
//! subscriber handle for everyone else's media.
//!
//! Janus takes two peer connections per participant where Confer takes one;
//! that is how VideoRoom works, and part of what is being compared.

use crate::peer::{Peer, Publish, Shared};
use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use webrtc::peer_connection::RTCIceCandidateInit;

const TIMEOUT: Duration = Duration::from_secs(20);

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// One Janus API session over one WebSocket.
struct Session {
    out: mpsc::UnboundedSender<Message>,
    waiters: Waiters,
    id: u64,
    next: AtomicU64,
}

impl Session {
    async fn open(url: &str) -> anyhow::Result<(Session, mpsc::UnboundedReceiver<Value>)> {
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "janus-protocol".parse()?);
        let (socket, _) = tokio_tungstenite::connect_async(req)
            .await
            .with_context(|| format!("connecting to Janus at {url}"))?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let close = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || close {
                    return;
                }
            }
        });
        let waiters: Waiters = Default::default();
        let (events_tx, events) = mpsc::unbounded_channel();
        let w = waiters.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                // "ack" only says a plugin message was received; its answer follows.
                if v["janus"] == "ack" {
                    continue;
                }
                let waiter = v["transaction"]
                    .as_str()
                    .and_then(|t| w.lock().unwrap().remove(t));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(v);
                    }
                    None => {
                        let _ = events_tx.send(v);
                    }
                }
            }
        });
        let mut s = Session {
            out,
            waiters,
            id: 0,
            next: AtomicU64::new(1),
        };
        let created = s.call(json!({"janus": "create"})).await?;
        s.id = created["data"]["id"].as_u64().context("no session id")?;
        let keepalive = s.out.clone();
        let id = s.id;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let msg = json!({"janus": "keepalive", "session_id": id, "transaction": "ka"});
                if keepalive
                    .send(Message::Text(msg.to_string().into()))
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok((s, events))
    }

    /// Sends a request and waits for its answer (for plugin messages, the
    /// plugin's event). Janus errors become errors.
    async fn call(&self, mut body: Value) -> anyhow::Result<Value> {
        let t = format!("t{}", self.next.fetch_add(1, Ordering::Relaxed));
        body["transaction"] = json!(t);
        if self.id != 0 {
            body["session_id"] = json!(self.id);
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(t, tx);
        let _ = self.out.send(Message::Text(body.to_string().into()));
        let v = tokio::time::timeout(TIMEOUT, rx)
            .await
            .with_context(|| format!("Janus did not answer {}", body["janus"]))??;
        if v["janus"] == "error" {
            bail!("Janus: {}", v["error"]);
        }
        if let Some(code) = v["plugindata"]["data"]["error_code"].as_u64() {
            bail!(
                "VideoRoom error {code}: {}",
                v["plugindata"]["data"]["error"]
            );
        }
        Ok(v)
    }

    async fn attach(&self) -> anyhow::Result<u64> {
        let v = self
            .call(json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}))
            .await?;
        v["data"]["id"].as_u64().context("no handle id")
    }

    async fn message(
        &self,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = json!({"janus": "message", "handle_id": handle, "body": body});
        if let Some(j) = jsep {
            req["jsep"] = j;
        }
        self.call(req).await
    }

    /// Sends a peer's ICE candidates to `handle` as Janus trickle messages.
    fn trickle(&self, handle: u64, mut candidates: mpsc::UnboundedReceiver<RTCIceCandidateInit>) {
        let (out, id) = (self.out.clone(), self.id);
        tokio::spawn(async move {
            while let Some(mut c) = candidates.recv().await {
                // An empty mid makes Janus ignore the candidate; the index serves.
                if c.sdp_mid.as_deref() == Some("") {
                    c.sdp_mid = None;
                }
                let msg = json!({"janus": "trickle", "session_id": id, "handle_id": handle,
                                 "transaction": "ice", "candidate": c});
                if out.send(Message::Text(msg.to_string().into())).is_err() {
                    return;
                }
            }
        });
    }
}

/// A Janus room id for a room name (VideoRoom's ids are numbers).
pub fn room_number(room: &str) -> u64 {
    // FNV-1a, kept under 2^53 so it survives JSON numbers everywhere.
    room.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) & ((1 << 53) - 1)
}

/// Adds the publishers a VideoRoom message lists, except `me`.
fn note_publishers(known: &mut BTreeSet<u64>, me: Option<u64>, v: &Value) {
    let listed = v["plugindata"]["data"]["publishers"].as_array();
    for id in listed
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
    {
        if Some(id) != me {
            known.insert(id);
        }
    }
}

/// One participant in a VideoRoom.
pub struct Participant {
    /// Sends (when publishing); receives nothing.
    pub publisher: Arc<Peer>,
    /// Receives everyone else's media.
    pub subscriber: Arc<Peer>,
    session: Session,
}

impl Participant {
    /// Joins `room`, publishes, waits until `feeds` other publishers are
    /// in the room, then subscribes to all of them at once.
    pub async fn join(
        url: &str,
        room: &str,
        name: &str,
        publish: Publish,
        feeds: usize,
        started_us: u64,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Participant> {
        let (session, mut events) = Session::open(url).await?;
        let room = room_number(room);
        let handle = session.attach().await?;
        // Whoever comes first creates the room; the others are told it exists (427).
        let create = json!({"request": "create", "room": room, "publishers": 1000,
                            "audiocodec": "opus", "videocodec": "vp8", "bitrate": 0});
        match session.message(handle, create, None).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("427") => {}
            Err(e) => return Err(e.context("creating the room")),
        }
        let joined = session
            .message(
                handle,
                json!({"request": "join", "ptype": "publisher", "room": room, "display": name}),
                None,
            )
            .await?;
        let me = joined["plugindata"]["data"]["id"].as_u64();
        let mut known: BTreeSet<u64> = BTreeSet::new();
        note_publishers(&mut known, me, &joined);

        let (cand_tx, cand_rx) = mpsc::unbounded_channel();
        let publisher =
            Arc::new(Peer::new(publish, name, started_us, shared.clone(), cand_tx).await?);
        session.trickle(handle, cand_rx);
        if publish != Publish::Nothing {
            let offer = publisher.create_offer().await?;
            let v = session
                .message(
                    handle,
                    json!({"request": "configure", "audio": true, "video": publish == Publish::AudioVideo}),
                    Some(json!({"type": "offer", "sdp": offer})),
                )
                .await?;
            let answer = v["jsep"]["sdp"].as_str().context("no answer to publish")?;
            publisher.accept_answer(answer.to_owned()).await?;
        }

        // Everyone else's feeds, as the room announces them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while known.len() < feeds {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(v)) => note_publishers(&mut known, me, &v),
                Ok(None) => bail!("Janus closed the session"),
                Err(_) => bail!("only {} of {feeds} publishers appeared", known.len()),
            }
        }

        let subscriber = if feeds == 0 {
            // Nobody else publishes (a webinar's speaker): nothing to
            // subscribe to, and the publishing peer stands in, receiving nothing.
            publisher.clone()
        } else {
            subscribe(&session, room, name, &known, started_us, shared).await?
        };
        // Later events (publishers leaving at the end) need no answer.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        Ok(Participant {
            publisher,
            subscriber,
            session,
        })
    }

    pub async fn leave(&self) {
        let _ = self.session.out.send(Message::Text(
            json!({"janus": "destroy", "session_id": self.session.id, "transaction": "bye"})
                .to_string()
                .into(),
        ));
        let _ = self.session.out.send(Message::Close(None));
        let _ = self.publisher.pc.close().await;
        let _ = self.subscriber.pc.close().await;
    }
}

/// One multistream subscriber handle for all of `feeds`: Janus offers, we answer.
async fn subscribe(
    session: &Session,
    room: u64,
    name: &str,
    feeds: &BTreeSet<u64>,
    started_us: u64,
    shared: Arc<Shared>,
) -> anyhow::Result<Arc<Peer>> {
    let sub_handle = session.attach().await?;
    let streams: Vec<Value> = feeds.iter().map(|id| json!({"feed": id})).collect();
    let v = session
        .message(
            sub_handle,
            json!({"request": "join", "ptype": "subscriber", "room": room, "streams": streams}),
            None,
        )
        .await?;
    let offer = v["jsep"]["sdp"].as_str().context("no offer to subscribe")?;
    let (cand_tx, cand_rx) = mpsc::unbounded_channel();
    let subscriber =
        Arc::new(Peer::new(Publish::Nothing, name, started_us, shared, cand_tx).await?);
    session.trickle(sub_handle, cand_rx);
    let answer = subscriber.answer(offer.to_owned()).await?;
    session
        .message(
            sub_handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer})),
        )
        .await?;
    Ok(subscriber)
}

#[cfg(test)]
mod tests {
    use super::room_number;

    #[test]
    fn room_numbers_are_stable_distinct_and_json_safe() {
        assert_eq!(room_number("load-1-0"), room_number("load-1-0"));
        assert_ne!(room_number("load-1-0"), room_number("load-1-1"));
        assert!(room_number("x") < 1 << 53);
    }
}
