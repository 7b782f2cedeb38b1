//! `confer signaling`'s view of the SFU nodes (`confer sfu`) it drives:
//! which are up, which room is on which, and the requests it sends them
//! (`docs/sfu-nodes.md`).
//!
//! A new room goes to the reachable node with the fewest participants, and
//! stays there until it closes. What is where is learnt from each node's
//! event socket, so a restarted signaling service finds its rooms again.
//! A node that goes away takes its rooms with it: their participants'
//! sockets close, their clients reconnect, and the rooms open again on
//! the nodes that are left.

use crate::media::{Announcement, Events, JoinAnswer, Joined, Link, Refusal, RoomError, ToNode};
use crate::protocol::{ErrorCode, ServerMessage};
use crate::sfu_node::{IDLE_TIMEOUT, PING_EVERY, Snapshot};
use confer_sfu::{Lifecycle, MediaSocket, ParticipantInfo, RoomSummary};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tracing::{debug, info, warn};

/// How long a node may take to answer a join or a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the admin API waits for a node's media socket counters.
const STATUS_WAIT: Duration = Duration::from_secs(2);

pub struct Nodes {
    /// Base URLs, e.g. `http://10.0.0.7:8081`.
    urls: Vec<String>,
    secret: String,
    http: reqwest::Client,
    state: Mutex<Placement>,
    observer: Mutex<Option<mpsc::UnboundedSender<Lifecycle>>>,
    me: std::sync::Weak<Nodes>,
}

#[derive(Default)]
struct Placement {
    up: Vec<bool>,
    /// Sessions this service has open on each node: the load that new
    /// rooms are balanced on (counted here, not from events, so that rooms
    /// opened at the same moment spread too).
    load: Vec<usize>,
    /// Room → node, from when the room is first placed.
    placed: HashMap<String, usize>,
    /// Rooms their node has told us are open.
    open: HashSet<String>,
}

/// A node as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStatus {
    pub url: String,
    pub up: bool,
    pub rooms: usize,
    pub participants: usize,
    /// The node's shared media socket, as it answered just now (None when
    /// it is down, did not answer, or runs without `udp_mux`).
    pub media_socket: Option<MediaSocket>,
}

impl Nodes {
    /// Starts following each node's events; joins go to nodes once they
    /// are connected.
    pub fn connect(urls: Vec<String>, secret: String) -> Arc<Nodes> {
        let n = urls.len();
        let nodes = Arc::new_cyclic(|me| Nodes {
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            secret,
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("a client with a time-out builds"),
            state: Mutex::new(Placement {
                up: vec![false; n],
                load: vec![0; n],
                ..Default::default()
            }),
            observer: Mutex::new(None),
            me: me.clone(),
        });
        for i in 0..n {
            tokio::spawn(follow(Arc::downgrade(&nodes), i));
        }
        nodes
    }

    pub fn observe(&self) -> mpsc::UnboundedReceiver<Lifecycle> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.observer.lock().unwrap() = Some(tx);
        rx
    }

    fn tell(&self, e: Lifecycle) {
        if let Some(tx) = self.observer.lock().unwrap().as_ref() {
            let _ = tx.send(e);
        }
    }

    /// Each node as signaling sees it, with its media socket's counters
    /// asked of the nodes that are up.
    pub async fn status(&self) -> Vec<NodeStatus> {
        let mut status: Vec<NodeStatus> = {
            let s = self.state.lock().unwrap();
            (0..self.urls.len())
                .map(|i| NodeStatus {
                    url: self.urls[i].clone(),
                    up: s.up[i],
                    rooms: s
                        .open
                        .iter()
                        .filter(|r| s.placed.get(*r) == Some(&i))
                        .count(),
                    participants: s.load[i],
                    media_socket: None,
                })
                .collect()
        };
        let asked = status
            .iter()
            .enumerate()
            .filter(|(_, n)| n.up)
            .map(|(i, _)| async move {
                (
                    i,
                    tokio::time::timeout(STATUS_WAIT, self.media_socket(i)).await,
                )
            });
        for (i, answer) in futures_util::future::join_all(asked).await {
            match answer {
                Ok(Ok(media)) => status[i].media_socket = media,
                Ok(Err(e)) => warn!(node = %self.urls[i], "media socket status: {e}"),
                Err(_) => {
                    warn!(node = %self.urls[i], "media socket status: no answer in {STATUS_WAIT:?}")
                }
            }
        }
        status
    }

    async fn media_socket(&self, i: usize) -> Result<Option<MediaSocket>, RoomError> {
        #[derive(Deserialize)]
        struct Answer {
            media_socket: Option<MediaSocket>,
        }
        let response = self.call(i, reqwest::Method::GET, "media", None).await?;
        let answer: Answer = response
            .json()
            .await
            .map_err(|e| RoomError::Unreachable(format!("{}: {e}", self.urls[i])))?;
        Ok(answer.media_socket)
    }

    /// Every node is connected.
    pub fn all_up(&self) -> bool {
        self.state.lock().unwrap().up.iter().all(|u| *u)
    }

    /// At least one node can take rooms.
    pub fn any_up(&self) -> bool {
        self.state.lock().unwrap().up.iter().any(|u| *u)
    }

    pub fn has_room(&self, id: &str) -> bool {
        self.state.lock().unwrap().open.contains(id)
    }

    pub fn room_count(&self) -> usize {
        self.state.lock().unwrap().open.len()
    }

    /// The node for `room`: where it is, or the least loaded one that is up.
    fn place(&self, room: &str) -> Option<usize> {
        let mut s = self.state.lock().unwrap();
        if let Some(&i) = s.placed.get(room)
            && s.up[i]
        {
            return Some(i);
        }
        let i = (0..self.urls.len())
            .filter(|&i| s.up[i])
            .min_by_key(|&i| s.load[i])?;
        s.placed.insert(room.to_owned(), i);
        Some(i)
    }

    /// A placement that never became a room (the join failed) is dropped,
    /// so the next join may choose again.
    fn unplace(&self, room: &str) {
        let mut s = self.state.lock().unwrap();
        if !s.open.contains(room) {
            s.placed.remove(room);
        }
    }

    fn ws_url(&self, i: usize, path: &str) -> String {
        format!("{}/sfu/v1/{path}", self.urls[i].replacen("http", "ws", 1))
    }

    async fn socket(
        &self,
        i: usize,
        path: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        String,
    > {
        let url = self.ws_url(i, path);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let auth = format!("Bearer {}", self.secret)
            .parse()
            .map_err(|_| "split.secret is not a valid header value".to_owned())?;
        request.headers_mut().insert("authorization", auth);
        let connect = tokio_tungstenite::connect_async(request);
        match tokio::time::timeout(REQUEST_TIMEOUT, connect).await {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(e)) => Err(format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer in {REQUEST_TIMEOUT:?}")),
        }
    }

    pub async fn join(&self, room: &str, info: ParticipantInfo) -> Result<Joined, Refusal> {
        let unavailable = |message: String| Refusal {
            code: ErrorCode::SfuUnavailable,
            message,
        };
        let Some(i) = self.place(room) else {
            return Err(unavailable(
                "no SFU node is reachable; try again shortly".into(),
            ));
        };
        let result = self.join_on(i, room, info).await;
        if result.is_err() {
            self.unplace(room);
        }
        result.map_err(|e| match e {
            Ok(refusal) => refusal,
            Err(message) => {
                warn!(node = %self.urls[i], room, "join failed: {message}");
                unavailable(format!("the SFU node for this room failed: {message}"))
            }
        })
    }

    /// `Err(Ok(_))`: the node refused; `Err(Err(_))`: it failed.
    async fn join_on(
        &self,
        i: usize,
        room: &str,
        info: ParticipantInfo,
    ) -> Result<Joined, Result<Refusal, String>> {
        let socket = self.socket(i, "session").await.map_err(Err)?;
        let (mut sink, mut stream) = socket.split();
        let join = ToNode::Join {
            room: room.to_owned(),
            user_id: info.user_id,
            name: info.name,
            role: info.role,
            downlink: info.downlink,
        };
        let text = |m: &ToNode| Message::Text(serde_json::to_string(m).expect("serialises").into());
        sink.send(text(&join))
            .await
            .map_err(|e| Err(e.to_string()))?;
        let answer = loop {
            match tokio::time::timeout(REQUEST_TIMEOUT, stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    break serde_json::from_str::<JoinAnswer>(t.as_str())
                        .map_err(|e| Err(format!("bad answer to join: {e}")))?;
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) => {
                    return Err(Err("the node closed the session".into()));
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(Err(e.to_string())),
                Err(_) => return Err(Err(format!("no answer in {REQUEST_TIMEOUT:?}"))),
            }
        };
        let (participant_id, others, recording) = match answer {
            JoinAnswer::Joined {
                participant_id,
                participants,
                recording,
            } => (participant_id, participants, recording),
            JoinAnswer::Refused { code, message } => return Err(Ok(Refusal { code, message })),
        };
        let (to_node, mut requests) = mpsc::unbounded_channel::<ToNode>();
        let (events, from_node) = mpsc::unbounded_channel::<ServerMessage>();
        let node = self.urls[i].clone();
        let id = participant_id.clone();
        self.state.lock().unwrap().load[i] += 1;
        let session = SessionCount(self.me.clone(), i);
        // Relays until either side ends; dropping `events` tells the
        // session its node is gone.
        tokio::spawn(async move {
            let mut ping = tokio::time::interval(PING_EVERY);
            loop {
                tokio::select! {
                    request = requests.recv() => {
                        let Some(request) = request else { break };
                        let leaving = matches!(request, ToNode::Leave { .. });
                        if sink.send(text(&request)).await.is_err() || leaving {
                            break;
                        }
                    }
                    incoming = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => match incoming {
                        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str(t.as_str()) {
                            Ok(m) => { let _ = events.send(m); }
                            Err(e) => warn!(%node, "bad message from SFU node: {e}"),
                        },
                        Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                        Ok(Some(Ok(_))) => {}
                        Err(_) => {
                            warn!(%node, participant = %id, "SFU node silent; session lost");
                            break;
                        }
                    },
                    _ = ping.tick() => {
                        if sink.send(Message::Ping(Default::default())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sink.send(Message::Close(None)).await;
            drop(session);
        });
        debug!(node = %self.urls[i], room, participant = %participant_id, "joined on SFU node");
        Ok(Joined {
            participant_id,
            others,
            recording,
            link: Link::Remote(to_node),
            events: Events::Remote(from_node),
        })
    }

    fn node_of(&self, room: &str) -> Result<usize, RoomError> {
        let s = self.state.lock().unwrap();
        match s.placed.get(room) {
            Some(&i) if s.open.contains(room) => Ok(i),
            _ => Err(RoomError::NoRoom(room.to_owned())),
        }
    }

    /// Sends a request to node `i`; a 404 becomes the matching error.
    async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, RoomError> {
        let url = format!("{}/sfu/v1/{path}", self.urls[i]);
        let mut request = self.http.request(method, &url).bearer_auth(&self.secret);
        if let Some(b) = body {
            request = request.json(&b);
        }
        let unreachable = |e: String| RoomError::Unreachable(format!("{url}: {e}"));
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        #[derive(Deserialize)]
        struct Body {
            error: Error,
        }
        #[derive(Deserialize)]
        struct Error {
            code: String,
        }
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<Body>(&text).map(|b| b.error.code) {
            Ok(code) if code == "no_such_room" => Err(RoomError::NoRoom(String::new())),
            Ok(code) if code == "no_such_participant" => {
                Err(RoomError::NoParticipant(String::new()))
            }
            _ => Err(unreachable(format!("{status}: {text}"))),
        }
    }

    pub async fn rooms(&self) -> Result<Vec<RoomSummary>, RoomError> {
        #[derive(Deserialize)]
        struct Rooms {
            rooms: Vec<RoomSummary>,
        }
        let up: Vec<usize> = {
            let s = self.state.lock().unwrap();
            (0..self.urls.len()).filter(|&i| s.up[i]).collect()
        };
        let mut all = Vec::new();
        for i in up {
            let r = self.call(i, reqwest::Method::GET, "rooms", None).await?;
            let rooms: Rooms = r
                .json()
                .await
                .map_err(|e| RoomError::Unreachable(e.to_string()))?;
            all.extend(rooms.rooms);
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    pub async fn room(&self, id: &str) -> Result<RoomSummary, RoomError> {
        let i = self.node_of(id)?;
        let path = format!("rooms/{}", segment(id));
        let r = self
            .call(i, reqwest::Method::GET, &path, None)
            .await
            .map_err(|e| named(e, id, ""))?;
        r.json()
            .await
            .map_err(|e| RoomError::Unreachable(e.to_string()))
    }

    pub async fn close_room(&self, id: &str, reason: &str) -> Result<(), RoomError> {
        let i = self.node_of(id)?;
        let path = format!("rooms/{}/close", segment(id));
        self.call(
            i,
            reqwest::Method::POST,
            &path,
            Some(json!({ "reason": reason })),
        )
        .await
        .map_err(|e| named(e, id, ""))?;
        Ok(())
    }

    pub async fn remove(
        &self,
        room: &str,
        participant: &str,
        reason: &str,
    ) -> Result<(), RoomError> {
        self.on_participant(room, participant, "remove", json!({ "reason": reason }))
            .await
    }

    pub async fn force_mute(
        &self,
        room: &str,
        participant: &str,
        by: &str,
    ) -> Result<(), RoomError> {
        self.on_participant(room, participant, "mute", json!({ "by": by }))
            .await
    }

    async fn on_participant(
        &self,
        room: &str,
        participant: &str,
        action: &str,
        body: serde_json::Value,
    ) -> Result<(), RoomError> {
        let i = self.node_of(room)?;
        let path = format!(
            "rooms/{}/participants/{}/{action}",
            segment(room),
            segment(participant)
        );
        self.call(i, reqwest::Method::POST, &path, Some(body))
            .await
            .map_err(|e| named(e, room, participant))?;
        Ok(())
    }

    /// Sent in the background: announcements are not worth waiting for.
    pub fn announce(self: &Arc<Self>, room: &str, what: Announcement) {
        let Ok(i) = self.node_of(room) else { return };
        let me = self.clone();
        let path = format!("rooms/{}/announce", segment(room));
        let body = serde_json::to_value(&what).expect("serialises");
        tokio::spawn(async move {
            if let Err(e) = me.call(i, reqwest::Method::POST, &path, Some(body)).await {
                warn!(error = %e, ?what, "announcement not delivered");
            }
        });
    }

    /// Node `i`'s events arrived: keeps placement and load up to date and
    /// passes them on.
    fn learn(&self, i: usize, e: Lifecycle) {
        {
            let mut s = self.state.lock().unwrap();
            match &e {
                Lifecycle::RoomOpened { room } => {
                    s.placed.insert(room.clone(), i);
                    s.open.insert(room.clone());
                }
                Lifecycle::RoomClosed { room, .. } => {
                    if s.placed.get(room) == Some(&i) {
                        s.placed.remove(room);
                        s.open.remove(room);
                    }
                }
                Lifecycle::Joined { .. } | Lifecycle::Left { .. } => {}
            }
        }
        self.tell(e);
    }

    fn node_up(&self, i: usize, snapshot: Snapshot) {
        let mut s = self.state.lock().unwrap();
        s.up[i] = true;
        for r in snapshot.rooms {
            s.placed.insert(r.id.clone(), i);
            s.open.insert(r.id);
        }
    }

    /// Node `i` is gone, and its rooms with it.
    fn node_down(&self, i: usize) {
        let lost: Vec<String> = {
            let mut s = self.state.lock().unwrap();
            s.up[i] = false;
            let lost: Vec<String> = s
                .placed
                .iter()
                .filter(|(_, n)| **n == i)
                .map(|(r, _)| r.clone())
                .collect();
            for r in &lost {
                s.placed.remove(r);
            }
            lost.into_iter().filter(|r| s.open.remove(r)).collect()
        };
        for room in lost {
            self.tell(Lifecycle::RoomClosed {
                room,
                reason: "its SFU node was lost".into(),
            });
        }
    }
}

/// One session open on a node, for its load, until dropped.
struct SessionCount(std::sync::Weak<Nodes>, usize);

impl Drop for SessionCount {
    fn drop(&mut self) {
        if let Some(nodes) = self.0.upgrade() {
            let mut s = nodes.state.lock().unwrap();
            s.load[self.1] = s.load[self.1].saturating_sub(1);
        }
    }
}

/// Fills in the names a node's 404 leaves out.
fn named(e: RoomError, room: &str, participant: &str) -> RoomError {
    match e {
        RoomError::NoRoom(_) => RoomError::NoRoom(room.to_owned()),
        RoomError::NoParticipant(_) => RoomError::NoParticipant(participant.to_owned()),
        e => e,
    }
}

/// A room or participant id as one URL path segment. Ids are checked at
/// admission (letters, digits, `-`, `_`, `.`), but escaping costs nothing.
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Follows node `i`'s events for as long as `nodes` lives, reconnecting
/// with back-off.
async fn follow(nodes: std::sync::Weak<Nodes>, i: usize) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let Some(me) = nodes.upgrade() else { return };
        let url = me.urls[i].clone();
        match me.socket(i, "events").await {
            Err(e) => debug!(node = %url, "SFU node not reachable: {e}"),
            Ok(socket) => {
                let (mut sink, mut stream) = socket.split();
                let mut first = true;
                loop {
                    let next = tokio::time::timeout(IDLE_TIMEOUT, stream.next()).await;
                    let text = match next {
                        Ok(Some(Ok(Message::Text(t)))) => t,
                        Ok(Some(Ok(Message::Ping(p)))) => {
                            let _ = sink.send(Message::Pong(p)).await;
                            continue;
                        }
                        Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                        Ok(Some(Ok(_))) => continue,
                        Err(_) => {
                            warn!(node = %url, "SFU node silent for {IDLE_TIMEOUT:?}");
                            break;
                        }
                    };
                    if first {
                        match serde_json::from_str::<Snapshot>(text.as_str()) {
                            Ok(s) => {
                                info!(node = %url, rooms = s.rooms.len(), "SFU node connected");
                                me.node_up(i, s);
                                backoff = Duration::from_millis(250);
                                first = false;
                            }
                            Err(e) => {
                                warn!(node = %url, "bad snapshot from SFU node: {e}");
                                break;
                            }
                        }
                        continue;
                    }
                    match serde_json::from_str::<Lifecycle>(text.as_str()) {
                        Ok(e) => me.learn(i, e),
                        Err(e) => warn!(node = %url, "bad event from SFU node: {e}"),
                    }
                }
                if !first {
                    warn!(node = %url, "SFU node lost; its rooms are closed");
                    me.node_down(i);
                }
            }
        }
        drop(me);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
