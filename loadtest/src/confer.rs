//! Joining a Confer room as the web client does (`docs/signaling.md`): a
//! token, the WebSocket, an offer, then answers to the server's offers and
//! trickle ICE both ways.

use crate::peer::{Peer, Publish, Shared};
use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webrtc::peer_connection::RTCIceCandidateInit;

/// Where join tokens come from.
#[derive(Clone)]
pub enum Tokens {
    /// Signed here with the home server's shared secret (HS256), as `call`
    /// tokens so that no schedule is needed.
    Secret(String),
    /// Confer's demo mode mints them (`POST /api/demo/token`).
    Demo,
}

impl Tokens {
    pub async fn get(
        &self,
        http: &reqwest::Client,
        base: &str,
        name: &str,
        room: &str,
    ) -> anyhow::Result<String> {
        match self {
            Tokens::Secret(secret) => {
                let exp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs()
                    + 24 * 3600;
                let claims = json!({
                    "sub": name, "name": name, "room": room,
                    "role": "participant", "kind": "call", "exp": exp,
                });
                Ok(jsonwebtoken::encode(
                    &jsonwebtoken::Header::default(),
                    &claims,
                    &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
                )?)
            }
            Tokens::Demo => {
                let r = http
                    .post(format!("{base}/api/demo/token"))
                    .json(&json!({"name": name, "room": room, "kind": "call"}))
                    .send()
                    .await
                    .context("demo token request")?;
                let status = r.status();
                let body: Value = r.json().await.context("demo token response")?;
                match body["token"].as_str() {
                    Some(t) if status.is_success() => Ok(t.to_owned()),
                    _ => bail!("no demo token ({status}): {body}"),
                }
            }
        }
    }
}

/// One participant in a Confer room.
pub struct Participant {
    pub peer: Arc<Peer>,
    ws: mpsc::UnboundedSender<Message>,
    /// Renegotiation racing a leave fails harmlessly; stay quiet about it.
    leaving: Arc<AtomicBool>,
}

impl Participant {
    /// Joins `room` at `base` (`http://host:port`) and starts negotiating.
    /// Returns once the server has admitted it.
    pub async fn join(
        base: &str,
        token: &str,
        name: &str,
        publish: Publish,
        started_us: u64,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Participant> {
        let ws_url = format!("{}/ws", base.replacen("http", "ws", 1));
        let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .with_context(|| format!("connecting to {ws_url}"))?;
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
        let send = |v: Value| {
            let _ = out.send(Message::Text(v.to_string().into()));
        };
        send(json!({"type": "join", "token": token, "downlink": shared.downlink}));
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(15), stream.next())
                .await
                .context("no answer to join within 15 s")?
                .context("socket closed before joining")??;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            match v["type"].as_str() {
                Some("joined") => break,
                Some("error") => bail!("join refused: {} ({})", v["message"], v["code"]),
                _ => {}
            }
        }
        let (cand_tx, mut cand_rx) = mpsc::unbounded_channel::<RTCIceCandidateInit>();
        let peer = Peer::new(publish, name, started_us, shared.clone(), cand_tx).await?;
        // docs/signaling.md: a client with nothing to send offers one
        // recvonly m-line; on a downlink it need not connect the first
        // connection at all (no handshake, no consent checks on it).
        let uplink = publish != Publish::Nothing || !shared.downlink;
        if uplink && publish == Publish::Nothing {
            peer.add_recvonly_audio().await?;
        }
        let ice_out = out.clone();
        tokio::spawn(async move {
            while let Some(c) = cand_rx.recv().await {
                let msg = json!({"type": "candidate", "candidate": c});
                if ice_out.send(Message::Text(msg.to_string().into())).is_err() {
                    return;
                }
            }
        });
        if uplink {
            send(json!({"type": "offer", "sdp": peer.create_offer().await?}));
        }
        let peer = Arc::new(peer);
        let task_peer = peer.clone();
        let answers = out.clone();
        let leaving = Arc::new(AtomicBool::new(false));
        let quiet = leaving.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                if v["type"] == "video_paused" && v["paused"] == true {
                    shared
                        .counters
                        .paused_videos
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = on_signal(&task_peer, &answers, &v).await
                    && !quiet.load(Ordering::Relaxed)
                {
                    tracing::warn!("{}: {e:#}", v["type"]);
                }
            }
        });
        Ok(Participant {
            peer,
            ws: out,
            leaving,
        })
    }

    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        let _ = self
            .ws
            .send(Message::Text(json!({"type": "leave"}).to_string().into()));
        let _ = self.ws.send(Message::Close(None));
        let _ = self.peer.pc.close().await;
        if let Some(downlink) = &self.peer.downlink {
            let _ = downlink.close().await;
        }
    }
}

async fn on_signal(
    peer: &Peer,
    out: &mpsc::UnboundedSender<Message>,
    v: &Value,
) -> anyhow::Result<()> {
    let sdp = || v["sdp"].as_str().map(str::to_owned).context("sdp");
    match v["type"].as_str() {
        Some("answer") => peer.accept_answer(sdp()?).await?,
        Some("offer") => {
            let msg = json!({"type": "answer", "sdp": peer.answer(sdp()?).await?});
            let _ = out.send(Message::Text(msg.to_string().into()));
        }
        Some("downlink_offer") => {
            let answer = peer.answer_downlink(sdp()?).await?;
            let msg = json!({"type": "downlink_answer", "sdp": answer});
            let _ = out.send(Message::Text(msg.to_string().into()));
        }
        Some("candidate") => {
            let c: RTCIceCandidateInit = serde_json::from_value(v["candidate"].clone())?;
            peer.pc.add_ice_candidate(c).await?;
        }
        Some("error") => tracing::warn!("server error: {v}"),
        _ => {}
    }
    Ok(())
}
