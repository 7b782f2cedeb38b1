//! Call history back to the home server: signed JSON POSTs, retried with
//! back-off, at least once and in order per meeting (`docs/webhooks.md`).
//!
//! Each room with undelivered events has one delivery task and an unbounded
//! queue, so a receiver that is down delays only its own deliveries, never
//! a meeting, and one room's backlog never holds up another's.

use chrono::{SecondsFormat, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// The signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "Confer-Signature";
pub const EVENT_ID_HEADER: &str = "Confer-Event-Id";

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Event {
    /// Unique; a receiver that sees an id twice has seen a retry.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub room: String,
    /// 1, 2, 3… per room, in the order things happened; restarts at 1 with
    /// each `meeting.started`.
    pub sequence: u64,
    /// RFC 3339, UTC.
    pub occurred_at: String,
    pub data: serde_json::Value,
}

pub struct Webhooks {
    client: reqwest::Client,
    url: String,
    secret: Vec<u8>,
    give_up_after: Duration,
    rooms: Mutex<Rooms>,
}

#[derive(Default)]
struct Rooms {
    /// Rooms with a delivery task running.
    queues: HashMap<String, mpsc::UnboundedSender<Event>>,
    /// Last sequence number used, per room with a meeting on.
    sequences: HashMap<String, u64>,
}

impl Webhooks {
    pub fn new(
        client: reqwest::Client,
        url: String,
        secret: &str,
        give_up_after: Duration,
    ) -> Arc<Webhooks> {
        Arc::new(Webhooks {
            client,
            url,
            secret: secret.as_bytes().to_vec(),
            give_up_after,
            rooms: Mutex::new(Rooms::default()),
        })
    }

    /// Queues an event; returns at once.
    pub fn send(self: &Arc<Self>, room: &str, kind: &'static str, data: serde_json::Value) {
        let mut rooms = self.rooms.lock().unwrap();
        let sequence = if kind == "meeting.started" {
            1
        } else {
            rooms.sequences.get(room).map_or(1, |s| s + 1)
        };
        if kind == "meeting.ended" {
            rooms.sequences.remove(room);
        } else {
            rooms.sequences.insert(room.to_owned(), sequence);
        }
        let tx = rooms.queues.entry(room.to_owned()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(self.clone().deliver_room(room.to_owned(), rx));
            tx
        });
        let _ = tx.send(Event {
            id: format!("evt_{:032x}", rand::random::<u128>()),
            kind,
            room: room.to_owned(),
            sequence,
            occurred_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            data,
        });
    }

    /// Delivers one room's events in order; ends when the queue is empty,
    /// checked under the map lock so no event is left behind.
    async fn deliver_room(self: Arc<Self>, room: String, mut rx: mpsc::UnboundedReceiver<Event>) {
        loop {
            while let Ok(event) = rx.try_recv() {
                self.deliver(&event).await;
            }
            {
                let mut rooms = self.rooms.lock().unwrap();
                if rx.is_empty() {
                    rooms.queues.remove(&room);
                    return;
                }
            }
        }
    }

    async fn deliver(&self, event: &Event) {
        let body = serde_json::to_vec(event).expect("events serialise");
        let started = Instant::now();
        let mut delay = FIRST_RETRY;
        let mut attempt = 1;
        loop {
            let t = Utc::now().timestamp();
            let result = self
                .client
                .post(&self.url)
                .header("Content-Type", "application/json")
                .header(SIGNATURE_HEADER, signature(&self.secret, t, &body))
                .header(EVENT_ID_HEADER, &event.id)
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => {
                    debug!(event = %event.id, kind = event.kind, attempt, "webhook delivered");
                    return;
                }
                Ok(r) => {
                    warn!(event = %event.id, kind = event.kind, attempt, status = %r.status(), "webhook refused; will retry")
                }
                Err(e) => {
                    warn!(event = %event.id, kind = event.kind, attempt, error = %e, "webhook not delivered; will retry")
                }
            }
            if started.elapsed() + delay > self.give_up_after {
                warn!(event = %event.id, kind = event.kind, room = %event.room, "webhook given up after webhooks.give_up_after");
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(LONGEST_RETRY);
            attempt += 1;
        }
    }
}

/// The `Confer-Signature` value for `body` sent at Unix time `t`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a `Confer-Signature` header as a receiver would (the docs'
/// reference, used by the tests): right key, and `t` within `tolerance`.
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: i64, tolerance: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now - t).abs() > tolerance {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_event_has_the_envelope_we_send() {
        let example: serde_json::Value =
            serde_json::from_str(&crate::doc_examples::marked("webhooks.md", "webhook-event"))
                .unwrap();
        let ours = serde_json::to_value(Event {
            id: "evt_1".into(),
            kind: "participant.joined",
            room: "r".into(),
            sequence: 1,
            occurred_at: "2026-11-24T09:02:11.418Z".into(),
            data: serde_json::json!({}),
        })
        .unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&example), keys(&ours));
    }

    /// The receiver code in docs/webhooks.md accepts our signatures and
    /// refuses a tampered body.
    #[test]
    fn the_documented_python_verifier_agrees() {
        let doc = crate::doc_examples::read("webhooks.md");
        let (_, code) = crate::doc_examples::fenced(&doc)
            .into_iter()
            .find(|(lang, _)| lang == "python")
            .expect("a python example");
        let body = br#"{"type":"meeting.started","room":"r"}"#;
        let t = Utc::now().timestamp();
        let header = signature(b"0123456789abcdef", t, body);
        let script = format!(
            "{code}\nimport sys\nbody = {body:?}.encode()\n\
             ok = verify(b'0123456789abcdef', '{header}', body)\n\
             bad = verify(b'0123456789abcdef', '{header}', body + b' ')\n\
             sys.exit(0 if ok and not bad else 1)\n",
            body = std::str::from_utf8(body).unwrap()
        );
        let status = std::process::Command::new("python3")
            .args(["-c", &script])
            .status()
            .expect("python3 runs");
        assert!(status.success(), "the documented verifier disagrees");
    }

    #[test]
    fn signatures_verify_and_reject_tampering() {
        let key = b"0123456789abcdef";
        let body = br#"{"type":"meeting.started"}"#;
        let h = signature(key, 1_700_000_000, body);
        assert!(h.starts_with("t=1700000000,v1="));
        assert!(verify(key, &h, body, 1_700_000_010, 300));
        assert!(!verify(key, &h, b"{}", 1_700_000_010, 300));
        assert!(!verify(b"another key12345", &h, body, 1_700_000_010, 300));
        assert!(
            !verify(key, &h, body, 1_700_001_000, 300),
            "replayed too late"
        );
        assert!(!verify(key, "garbage", body, 1_700_000_000, 300));
    }
}
