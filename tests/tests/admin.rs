//! The admin API (`docs/http-api.md`): with the secret an operator lists
//! rooms, sees who publishes what and what reaches whom, removes someone and
//! closes a room; without it, nothing.

use confer_tests::{Client, Kind, TestServer, init_logging};
use serde_json::Value;
use std::time::{Duration, Instant};

const SECRET: &str = "an-admin-secret-for-tests";

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The object keys of `v`, recursively (through the first element of
/// arrays), as paths: what a client of the API relies on.
fn shape(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let path = format!("{at}.{k}");
                out.push(path.clone());
                shape(v, &path, out);
            }
        }
        Value::Array(a) => {
            if let Some(first) = a.first() {
                shape(first, &format!("{at}[]"), out);
            }
        }
        _ => {}
    }
    out.sort();
}

/// `r` is the API's error `code` with HTTP `status`.
async fn expect_error(r: reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status(), status);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
}

fn documented_room() -> Value {
    let example = confer_signaling::doc_examples::marked("http-api.md", "admin-room");
    serde_json::from_str(&example).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_who_gets_what_removes_and_closes() {
    init_logging();
    let server = TestServer::start_with(|c| c.auth.admin_secret = Some(SECRET.into()))
        .await
        .unwrap();
    let api = format!("http://{}/api/admin", server.addr);
    let http = reqwest::Client::new();
    let get = |path: &str, secret: Option<&str>| {
        let mut req = http.get(format!("{api}{path}"));
        if let Some(s) = secret {
            req = req.bearer_auth(s);
        }
        req.send()
    };

    for secret in [None, Some("wrong-secret-of-some-length")] {
        let r = get("/rooms", secret).await.unwrap();
        expect_error(r, 401, "unauthorized").await;
    }
    let r = get("/rooms", Some(SECRET)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["rooms"],
        Value::Array(vec![])
    );

    let ann = Client::join(&server, "ann", "ops", 1, true).await.unwrap();
    let bo = Client::join(&server, "bo", "ops", 2, true).await.unwrap();
    until("media both ways", || {
        ann.received(&bo.participant_id, Kind::Video).packets.len() > 10
            && bo.received(&ann.participant_id, Kind::Video).packets.len() > 10
    })
    .await;

    let json = |path: &'static str| {
        let request = get(path, Some(SECRET));
        async move { request.await.unwrap().json::<Value>().await.unwrap() }
    };
    let rooms = json("/rooms").await;
    let room = &rooms["rooms"][0];
    assert_eq!(room["id"], "ops");
    let mut got = Vec::new();
    shape(room, "", &mut got);
    let mut documented = Vec::new();
    shape(&documented_room(), "", &mut documented);
    assert_eq!(got, documented, "the room as served and as documented");

    let people = room["participants"].as_array().unwrap();
    assert_eq!(people.len(), 2);
    let ann_row = people
        .iter()
        .find(|p| p["id"] == ann.participant_id.as_str())
        .unwrap();
    assert_eq!(ann_row["name"], "ann");
    assert_eq!(ann_row["tracks"].as_array().unwrap().len(), 2);
    // Ann is sent Bo's two tracks, whole, and asked for the best.
    let receiving = ann_row["downlink"]["receiving"].as_array().unwrap();
    assert_eq!(receiving.len(), 2, "{receiving:?}");
    for r in receiving {
        assert!(
            r["track_id"]
                .as_str()
                .unwrap()
                .starts_with(&bo.participant_id)
        );
        assert_eq!(r["layer"], 0);
        assert_eq!(r["requested"], "high");
        assert_eq!(r["paused"], false);
        assert_eq!(r["left_out"], false);
    }
    // A clean loopback link: no limit known.
    assert_eq!(ann_row["downlink"]["estimate_bps"], Value::Null);

    // The media socket: the port media flows through, and a datagram from
    // nowhere counted as unrouted, not as load.
    let media = json("/sfu-nodes").await;
    let mut got = Vec::new();
    shape(&media, "", &mut got);
    let mut documented = Vec::new();
    let example = confer_signaling::doc_examples::marked("http-api.md", "admin-sfu-nodes-embedded");
    shape(
        &serde_json::from_str(&example).unwrap(),
        "",
        &mut documented,
    );
    assert_eq!(
        got, documented,
        "the media plane as served and as documented"
    );
    assert_eq!(media["mode"], "embedded");
    let port = server.sfu().media_port().unwrap();
    assert_eq!(media["media_socket"]["port"], port);
    assert_eq!(media["media_socket"]["dropped_arriving"], 0);
    assert_eq!(media["media_socket"]["dropped_sending"], 0);
    let unrouted = |m: &Value| m["media_socket"]["unrouted"].as_u64().unwrap();
    let before = unrouted(&media);
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .send_to(b"\x80not-media", ("127.0.0.1", port))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while unrouted(&json("/sfu-nodes").await) == before {
        assert!(
            Instant::now() < deadline,
            "the stray datagram was never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let one = json("/rooms/ops").await;
    assert_eq!(one["participants"].as_array().unwrap().len(), 2);
    let r = get("/rooms/nowhere", Some(SECRET)).await.unwrap();
    expect_error(r, 404, "no_such_room").await;

    // Removing: a participant that is not there, then Bo.
    let delete = |path: String| {
        http.delete(format!("{api}{path}"))
            .bearer_auth(SECRET)
            .send()
    };
    let r = delete("/rooms/ops/participants/nobody".into())
        .await
        .unwrap();
    expect_error(r, 404, "no_such_participant").await;
    let r = delete(format!("/rooms/ops/participants/{}", bo.participant_id))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    until("bo removed", || !bo.events_of("removed").is_empty()).await;
    until("ann told", || {
        ann.events_of("participant_left")
            .iter()
            .any(|e| e["participant_id"] == bo.participant_id.as_str())
    })
    .await;

    let r = delete("/rooms/ops".into()).await.unwrap();
    assert_eq!(r.status(), 204);
    until("ann removed", || !ann.events_of("removed").is_empty()).await;
    assert_eq!(get("/rooms/ops", Some(SECRET)).await.unwrap().status(), 404);
    assert_eq!(delete("/rooms/ops".into()).await.unwrap().status(), 404);
}

#[tokio::test]
async fn without_a_configured_secret_the_admin_api_is_off() {
    let server = TestServer::start().await.unwrap();
    let r = reqwest::Client::new()
        .get(format!("http://{}/api/admin/rooms", server.addr))
        .bearer_auth(SECRET)
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "admin_disabled").await;
}
