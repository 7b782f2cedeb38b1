//! A split deployment: `confer signaling` with its rooms on two SFU nodes
//! (`confer sfu`), each on a runtime of its own as if on another machine.
//! Clients see no difference; rooms spread over the nodes; the admin API
//! and moderators reach rooms wherever they are; and a node that dies
//! takes only its own rooms, which open again on the node that is left.

use confer_tests::{Client, Kind, Signal, TestNode, TestServer, init_logging, recorder_worker};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ADMIN: &str = "an-admin-secret-for-tests";

async fn until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn media_both_ways(a: &Client, b: &Client, packets: usize) -> bool {
    [Kind::Audio, Kind::Video].iter().all(|&k| {
        a.received(&b.participant_id, k).packets.len() >= packets
            && b.received(&a.participant_id, k).packets.len() >= packets
    })
}

fn rooms_on(node: &TestNode) -> Vec<String> {
    node.sfu.rooms().into_iter().map(|r| r.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_spread_over_sfu_nodes_and_are_driven_from_signaling() {
    init_logging();
    let (one, two) = (TestNode::start().unwrap(), TestNode::start().unwrap());
    let server =
        TestServer::start_split(&[&one, &two], |c| c.auth.admin_secret = Some(ADMIN.into()))
            .await
            .unwrap();

    let ann = Client::join(&server, "ann", "east", 1, true).await.unwrap();
    let bo = Client::join(&server, "bo", "east", 2, true).await.unwrap();
    let cy = Client::join(&server, "cy", "west", 3, true).await.unwrap();
    let di = Client::join(&server, "di", "west", 4, true).await.unwrap();
    until("media in both rooms", Duration::from_secs(30), || {
        media_both_ways(&ann, &bo, 30) && media_both_ways(&cy, &di, 30)
    })
    .await;
    // Nothing crosses rooms, and each room is on one node: the second room
    // went to the node with nobody on it.
    assert!(
        ann.received(&cy.participant_id, Kind::Video)
            .packets
            .is_empty()
    );
    let (r1, r2) = (rooms_on(&one), rooms_on(&two));
    assert_eq!(r1.len() + r2.len(), 2, "{r1:?} {r2:?}");
    assert_eq!((r1.len(), r2.len()), (1, 1), "{r1:?} {r2:?}");
    assert!(ann.saw(|e| e["type"] == "participant_joined" && e["participant"]["name"] == "bo"));

    // The admin API lists the rooms of both nodes, and acts on them.
    let http = reqwest::Client::new();
    let api = format!("http://{}/api/admin", server.addr);
    let admin = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{api}{path}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let get = |path: &'static str| {
        let sent = admin(reqwest::Method::GET, path);
        async move { sent.await.unwrap().json::<Value>().await.unwrap() }
    };
    // Both nodes up, each with its own media socket, as documented.
    let nodes = get("/sfu-nodes").await;
    assert_eq!(nodes["mode"], "split");
    let example: Value = serde_json::from_str(&confer_signaling::doc_examples::marked(
        "http-api.md",
        "admin-sfu-nodes",
    ))
    .unwrap();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    for (row, node) in nodes["nodes"].as_array().unwrap().iter().zip([&one, &two]) {
        assert_eq!(keys(row), keys(&example["nodes"][0]));
        assert_eq!(
            keys(&row["media_socket"]),
            keys(&example["nodes"][0]["media_socket"])
        );
        assert_eq!(row["url"], node.url.as_str());
        assert_eq!(row["up"], true);
        assert_eq!(row["media_socket"]["port"], node.sfu.media_port().unwrap());
    }
    let rooms = get("/rooms").await;
    let ids: Vec<&str> = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["east", "west"]);
    let west = get("/rooms/west").await;
    assert_eq!(west["participants"].as_array().unwrap().len(), 2, "{west}");
    let r = admin(reqwest::Method::DELETE, "/rooms/west/participants/nobody")
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_such_participant", "{body}");
    let path = format!("/rooms/west/participants/{}", di.participant_id);
    let r = admin(reqwest::Method::DELETE, &path).await.unwrap();
    assert_eq!(r.status(), 204);
    until("di removed and cy told", Duration::from_secs(10), || {
        di.saw(|e| e["type"] == "removed")
            && cy.saw(|e| {
                e["type"] == "participant_left" && e["participant_id"] == di.participant_id.as_str()
            })
    })
    .await;

    // A client's requests reach its node, and so do its errors.
    bo.send(json!({ "type": "mute", "kind": "audio", "muted": true }));
    until("ann told bo muted", Duration::from_secs(10), || {
        ann.saw(|e| e["type"] == "mute" && e["muted"] == true)
    })
    .await;
    bo.send(json!({ "type": "answer", "sdp": "garbage" }));
    until("bo's bad answer refused", Duration::from_secs(10), || {
        bo.saw(|e| e["type"] == "error" && e["code"] == "bad_sdp")
    })
    .await;
    assert!(media_both_ways(&ann, &bo, 30));

    // Leaving is seen, and closing a room through the admin API ends it.
    ann.leave().await;
    until("bo told ann left", Duration::from_secs(15), || {
        bo.saw(|e| e["type"] == "participant_left")
    })
    .await;
    let r = admin(reqwest::Method::DELETE, "/rooms/west").await.unwrap();
    assert_eq!(r.status(), 204);
    until(
        "cy removed as the room closed",
        Duration::from_secs(10),
        || cy.saw(|e| e["type"] == "removed"),
    )
    .await;
    until(
        "west gone from signaling's view",
        Duration::from_secs(10),
        || !server.nodes().has_room("west"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_sfu_node_takes_only_its_rooms_which_open_again_elsewhere() {
    init_logging();
    let (one, two) = (TestNode::start().unwrap(), TestNode::start().unwrap());
    let server = TestServer::start_split(&[&one, &two], |_| {})
        .await
        .unwrap();

    // One room on each node; the doomed one is watched through a raw socket.
    let mut watcher = Signal::connect(&server.ws_url()).await.unwrap();
    watcher.send(json!({ "type": "join", "token": server.token("wat", "doomed") }));
    watcher
        .expect("joined", Duration::from_secs(10))
        .await
        .unwrap();
    let cy = Client::join(&server, "cy", "safe", 3, true).await.unwrap();
    let di = Client::join(&server, "di", "safe", 4, true).await.unwrap();
    until("media in the safe room", Duration::from_secs(30), || {
        media_both_ways(&cy, &di, 30)
    })
    .await;
    let (doomed, left) = if rooms_on(&one) == ["doomed"] {
        (one, two)
    } else {
        assert_eq!(rooms_on(&two), ["doomed"]);
        (two, one)
    };

    doomed.kill();
    // The watcher's socket closes (its client would reconnect)...
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left_time = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left_time, watcher.rx.recv()).await {
            Ok(None) => break,
            Ok(Some(_)) => {}
            Err(_) => panic!("the socket of a participant on a dead node stayed open"),
        }
    }
    until(
        "signaling drops the dead node's room",
        Duration::from_secs(15),
        || !server.nodes().has_room("doomed"),
    )
    .await;
    // ...the other room carries on...
    let before = cy.received(&di.participant_id, Kind::Audio).packets.len();
    until(
        "media still flowing in the safe room",
        Duration::from_secs(10),
        || cy.received(&di.participant_id, Kind::Audio).packets.len() > before + 50,
    )
    .await;
    // ...and the lost room opens again on the node that is left.
    let ann = Client::join(&server, "ann", "doomed", 1, true)
        .await
        .unwrap();
    let bo = Client::join(&server, "bo", "doomed", 2, true)
        .await
        .unwrap();
    until(
        "media in the room reopened",
        Duration::from_secs(30),
        || media_both_ways(&ann, &bo, 30),
    )
    .await;
    let mut rooms = rooms_on(&left);
    rooms.sort();
    assert_eq!(rooms, ["doomed", "safe"]);
}

/// Recording in a split deployment: a recorder process joins the room on
/// its node through signaling, and the room hears of the recording through
/// its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_process_records_a_room_on_an_sfu_node() {
    init_logging();
    let node = TestNode::start().unwrap();
    let store_dir =
        std::env::temp_dir().join(format!("confer-split-{:016x}", rand::random::<u64>()));
    let dir = store_dir.clone();
    let server = TestServer::start_split(&[&node], move |c| c.recording.local_dir = Some(dir))
        .await
        .unwrap();
    // The recorder stores where signaling lists from.
    let spool = store_dir.join("spool");
    let (run, _stop) = recorder_worker(&server, &store_dir, &spool, 3);
    let recorder = tokio::spawn(run);
    let recordings = server.state.recordings.clone();
    until("the recorder connected", Duration::from_secs(10), || {
        recordings.remote.as_ref().unwrap().count() == 1
    })
    .await;

    let ann = Client::join(&server, "ann", "taped", 1, true)
        .await
        .unwrap();
    let bo = Client::join(&server, "bo", "taped", 2, true).await.unwrap();
    until("media", Duration::from_secs(30), || {
        media_both_ways(&ann, &bo, 30)
    })
    .await;
    let id = recordings.start("taped", "Taped", "user-ann").unwrap();
    until(
        "the room told it is recorded",
        Duration::from_secs(10),
        || bo.saw(|e| e["type"] == "recording" && e["state"] == "started"),
    )
    .await;
    until(
        "the recorder in the room on the node",
        Duration::from_secs(10),
        || {
            node.sfu
                .room("taped")
                .is_some_and(|r| r.summary().participants.len() == 3)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    recordings.stop("taped", "stopped by a moderator").unwrap();
    until("the recording available", Duration::from_secs(30), || {
        ann.saw(|e| {
            e["type"] == "recording"
                && e["state"] == "available"
                && e["recording_id"] == id.as_str()
        })
    })
    .await;
    let list = recordings.list("taped").await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].duration_ms >= 3000, "{:?}", list[0]);
    // Hidden from the participants, as with one process.
    assert!(
        !ann.saw(|e| e["type"] == "participant_joined" && e["participant"]["role"] == "recorder")
    );
    recorder.abort();
}

/// The node API answers only signaling: a wrong or missing secret is
/// refused, as are requests for rooms it does not hold and bad bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sfu_node_refuses_whoever_lacks_the_secret() {
    init_logging();
    let node = TestNode::start().unwrap();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, secret: Option<&str>| {
        let mut r = http.request(method, format!("{}/sfu/v1/{path}", node.url));
        if let Some(s) = secret {
            r = r.bearer_auth(s);
        }
        r
    };
    for secret in [None, Some("a-wrong-secret-of-enough-characters-here")] {
        let r = call(reqwest::Method::GET, "rooms", secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    }
    let secret = Some(confer_tests::SPLIT_SECRET);
    let r = call(reqwest::Method::POST, "rooms/nowhere/close", secret)
        .json(&json!({ "reason": "test" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_such_room", "{body}");
    let r = call(reqwest::Method::POST, "rooms/nowhere/announce", secret)
        .json(&json!({ "type": "fireworks" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    // A session socket that does not start with a join is closed.
    let mut request = format!("{}/sfu/v1/session", node.url.replacen("http", "ws", 1))
        .into_client_request()
        .unwrap();
    let auth = format!("Bearer {}", confer_tests::SPLIT_SECRET);
    request
        .headers_mut()
        .insert("authorization", auth.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
        .send(Message::Text(r#"{"type":"offer","sdp":"v=0"}"#.into()))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
    assert!(
        matches!(
            next,
            Ok(None) | Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_)))
        ),
        "{next:?}"
    );
    assert!(node.sfu.rooms().is_empty());
}
