//! The HTTP schedule source against a small home server started here; what
//! happens when the home server is down or never answers; and webhooks to a
//! receiver that fails at first, checked for signatures, order and retries.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{Duration as Span, SecondsFormat, Utc};
use confer_signaling::config::{SourceKind, Unreachable};
use confer_signaling::schedule::{Identity, Lookup};
use confer_signaling::token::JoinKind;
use confer_signaling::webhook;
use confer_tests::{Signal, TestServer, claims, init_logging};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BEARER: &str = "Bearer home-server-api-key";

#[derive(Default)]
struct Home {
    requests: AtomicU32,
    down: AtomicBool,
}

/// The documented answer (docs/home-server.md): one meeting on now.
async fn meeting(
    State(home): State<Arc<Home>>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, StatusCode> {
    home.requests.fetch_add(1, Ordering::SeqCst);
    if home.down.load(Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(BEARER) {
        return Err(StatusCode::UNAUTHORIZED);
    }
    if room != "planning" {
        return Err(StatusCode::NOT_FOUND);
    }
    let t = |d: Span| (Utc::now() + d).to_rfc3339_opts(SecondsFormat::Secs, true);
    Ok(Json(json!({
        "meetings": [{
            "title": "Planning",
            "start": t(Span::minutes(-5)),
            "end": t(Span::minutes(55)),
            "status": "confirmed",
            "organizer": "alice@example.com",
            "invitees": [{"id": "bob@example.com"}, {"id": "carol@example.com", "declined": true}]
        }]
    })))
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn home_server() -> (Arc<Home>, String) {
    let home = Arc::new(Home::default());
    let router = Router::new()
        .route("/api/meetings/{room}", get(meeting))
        .with_state(home.clone());
    (home.clone(), serve(router).await)
}

async fn join(server: &TestServer, room: &str, email: &str) -> Result<Value, (String, String)> {
    let mut c = claims(email.split('@').next().unwrap(), room, JoinKind::Meeting);
    c.email = Some(email.to_owned());
    let mut sig = Signal::connect(&server.ws_url()).await.unwrap();
    sig.send(json!({"type": "join", "token": server.mint(c)}));
    loop {
        let v = tokio::time::timeout(Duration::from_secs(30), sig.rx.recv())
            .await
            .expect("an answer to join within 30 s")
            .expect("socket open");
        match v["type"].as_str() {
            Some("joined") => {
                sig.send(json!({"type": "leave"}));
                return Ok(v);
            }
            Some("error") => {
                let s = |k: &str| v[k].as_str().unwrap().to_owned();
                return Err((s("code"), s("message")));
            }
            _ => {}
        }
    }
}

fn http_source(url: String, policy: Unreachable) -> impl FnOnce(&mut confer_signaling::Config) {
    move |c| {
        c.schedule.source = SourceKind::Http;
        c.schedule.http.url = Some(url);
        c.schedule.http.auth_header = Some("Authorization".into());
        c.schedule.http.auth_value = Some(BEARER.into());
        c.schedule.timeout = Duration::from_secs(1);
        c.schedule.retries = 1;
        c.schedule.when_unreachable = policy;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_source_admits_and_fifty_joins_ask_once() {
    init_logging();
    let (home, base) = home_server().await;
    let server = TestServer::start_with(http_source(
        format!("{base}/api/meetings/{{room}}?from={{from}}&to={{to}}"),
        Unreachable::Refuse,
    ))
    .await
    .unwrap();

    assert_eq!(
        join(&server, "planning", "alice@example.com")
            .await
            .unwrap()["role"],
        "moderator"
    );
    assert_eq!(
        join(&server, "planning", "bob@example.com").await.unwrap()["role"],
        "participant"
    );
    assert_eq!(
        join(&server, "planning", "carol@example.com")
            .await
            .unwrap_err()
            .0,
        "not_invited"
    );
    assert_eq!(
        join(&server, "elsewhere", "bob@example.com")
            .await
            .unwrap_err()
            .0,
        "meeting_not_found"
    );
    // All of "planning" came from one request; "elsewhere" cost one more.
    assert_eq!(home.requests.load(Ordering::SeqCst), 2);

    // Fifty people joining a meeting the cache has not seen: one request.
    let schedule = server.state.schedule.clone().unwrap();
    let before = home.requests.load(Ordering::SeqCst);
    let joins: Vec<_> = (0..50)
        .map(|i| {
            let s = schedule.clone();
            tokio::spawn(async move {
                let user = format!("user{i}");
                s.admit(
                    "planning-2",
                    Identity {
                        user_id: &user,
                        email: None,
                    },
                    Utc::now(),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.code())
            })
        })
        .collect();
    for j in joins {
        assert_eq!(j.await.unwrap(), Err("meeting_not_found"));
    }
    assert_eq!(home.requests.load(Ordering::SeqCst) - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_home_server_is_refused_quickly_or_served_from_cache() {
    init_logging();
    // Connection refused: nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = TestServer::start_with(http_source(
        format!("http://{closed}/api/meetings/{{room}}"),
        Unreachable::Refuse,
    ))
    .await
    .unwrap();
    let t = Instant::now();
    let (code, message) = join(&server, "planning", "bob@example.com")
        .await
        .unwrap_err();
    assert_eq!(code, "home_server_unreachable");
    assert!(message.contains("could not be reached"), "{message}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "refused after {:?}",
        t.elapsed()
    );

    // A server that accepts and never answers: bounded by the time-out
    // (1 s) times two attempts plus back-off.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let server = TestServer::start_with(http_source(
        format!("http://{silent_addr}/api/meetings/{{room}}"),
        Unreachable::Refuse,
    ))
    .await
    .unwrap();
    let t = Instant::now();
    assert_eq!(
        join(&server, "planning", "bob@example.com")
            .await
            .unwrap_err()
            .0,
        "home_server_unreachable"
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );

    // use_cache: an answer fetched while the home server was up still
    // admits after the cache entry expired and the server went down.
    let (home, base) = home_server().await;
    let server = TestServer::start_with(|c| {
        http_source(
            format!("{base}/api/meetings/{{room}}"),
            Unreachable::UseCache,
        )(c);
        c.schedule.cache_ttl = Duration::ZERO;
    })
    .await
    .unwrap();
    assert!(join(&server, "planning", "bob@example.com").await.is_ok());
    home.down.store(true, Ordering::SeqCst);
    let schedule = server.state.schedule.clone().unwrap();
    let who = Identity {
        user_id: "user-bob",
        email: Some("bob@example.com"),
    };
    let (_, how) = schedule.admit("planning", who, Utc::now()).await.unwrap();
    assert_eq!(how, Lookup::Stale);
    assert!(join(&server, "planning", "bob@example.com").await.is_ok());
    // A meeting never seen before cannot be served from the cache.
    assert_eq!(
        join(&server, "planning-3", "bob@example.com")
            .await
            .unwrap_err()
            .0,
        "home_server_unreachable"
    );
}

#[derive(Default)]
struct Receiver {
    /// (signature header, body) of every delivery attempt.
    attempts: Mutex<Vec<(String, Vec<u8>)>>,
    /// Refuse this many attempts first (503).
    refuse: AtomicU32,
}

async fn receive(
    State(r): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let sig = headers
        .get(webhook::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    r.attempts.lock().unwrap().push((sig, body.to_vec()));
    let left = r.refuse.load(Ordering::SeqCst);
    if left > 0 {
        r.refuse.store(left - 1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_in_order() {
    init_logging();
    const SECRET: &str = "webhook-secret-0123456789";
    let receiver = Arc::new(Receiver {
        refuse: AtomicU32::new(2),
        ..Default::default()
    });
    let base = serve(
        Router::new()
            .route("/hooks", post(receive))
            .with_state(receiver.clone()),
    )
    .await;
    let server = TestServer::start_with(|c| {
        c.schedule.source = SourceKind::None;
        c.webhooks.url = Some(format!("{base}/hooks"));
        c.webhooks.secret = Some(SECRET.into());
    })
    .await
    .unwrap();

    // A call comes and goes while the receiver is refusing: joining is not slowed.
    let t = Instant::now();
    let mut a = Signal::connect(&server.ws_url()).await.unwrap();
    a.send(json!({"type": "join", "token": server.token("ann", "hooked")}));
    a.expect("joined", Duration::from_secs(5)).await.unwrap();
    let mut b = Signal::connect(&server.ws_url()).await.unwrap();
    b.send(json!({"type": "join", "token": server.token("ben", "hooked")}));
    b.expect("joined", Duration::from_secs(5)).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "joins took {:?}",
        t.elapsed()
    );
    b.send(json!({"type": "leave"}));
    a.send(json!({"type": "leave"}));

    // The room empties and closes after the test's 1 s grace; all events
    // arrive, the first after two refusals (1 s + 2 s of back-off).
    let expected = [
        "meeting.started",
        "participant.joined",
        "participant.joined",
        "participant.left",
        "participant.left",
        "meeting.ended",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivered = loop {
        let attempts = receiver.attempts.lock().unwrap().clone();
        // Attempts 0 and 1 were refused; every later one succeeded.
        let delivered: Vec<Value> = attempts
            .iter()
            .skip(2)
            .map(|(_, body)| serde_json::from_slice(body).unwrap())
            .collect();
        if delivered.len() >= expected.len() {
            break delivered;
        }
        assert!(
            Instant::now() < deadline,
            "only {} events delivered: {delivered:?}",
            delivered.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kinds: Vec<&str> = delivered
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, expected);
    let sequences: Vec<u64> = delivered
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5, 6]);
    assert!(delivered.iter().all(|e| e["room"] == "hooked"));
    assert_eq!(delivered[1]["data"]["user_id"], "user-ann");
    assert_eq!(delivered[5]["data"]["reason"], "empty");

    // Every attempt is signed over its body; the retried event kept its id.
    let attempts = receiver.attempts.lock().unwrap().clone();
    let now = Utc::now().timestamp();
    for (sig, body) in &attempts {
        assert!(
            webhook::verify(SECRET.as_bytes(), sig, body, now, 300),
            "bad signature {sig}"
        );
        assert!(!webhook::verify(
            b"wrong-secret-0123456789",
            sig,
            body,
            now,
            300
        ));
    }
    let id = |i: usize| serde_json::from_slice::<Value>(&attempts[i].1).unwrap()["id"].clone();
    assert_eq!(id(0), id(2), "a retry carries the same event id");
}
