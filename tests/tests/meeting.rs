//! Participants join a room over loopback with real WebRTC, publish audio
//! and video, and receive everyone else's media intact and in order.

use confer_tests::{Client, Kind, TestServer, init_logging, verify_stream};
use std::time::{Duration, Instant};

/// Waits until `cond` holds, polling; fails with `what` after `within`.
async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every client receives at least `audio`/`video` packets from every other.
async fn wait_for_media(clients: &[Client], audio: usize, video: usize, within: Duration) {
    wait_for("media from every other participant", within, || {
        clients.iter().all(|c| {
            clients
                .iter()
                .filter(|o| o.participant_id != c.participant_id)
                .all(|o| {
                    c.received(&o.participant_id, Kind::Audio).packets.len() >= audio
                        && c.received(&o.participant_id, Kind::Video).packets.len() >= video
                })
        })
    })
    .await;
}

fn verify_all(clients: &[Client]) {
    for c in clients {
        assert!(
            !c.publishers().contains(&c.participant_id),
            "{} received its own media",
            c.name
        );
        for o in clients
            .iter()
            .filter(|o| o.participant_id != c.participant_id)
        {
            for kind in [Kind::Audio, Kind::Video] {
                let r = c.received(&o.participant_id, kind);
                verify_stream(&r, o.index, kind, 0)
                    .unwrap_or_else(|e| panic!("{} ← {} {kind:?}: {e}", c.name, o.name));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_participants_exchange_audio_and_video() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let a = Client::join(&server, "alice", "pair", 1, true)
        .await
        .unwrap();
    let b = Client::join(&server, "bob", "pair", 2, true).await.unwrap();
    let clients = [a, b];
    wait_for_media(&clients, 100, 60, Duration::from_secs(30)).await;
    verify_all(&clients);
    assert!(
        clients[0].saw(|e| e["type"] == "participant_joined" && e["participant"]["name"] == "bob")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_participants_and_one_vanishes() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let mut clients = Vec::new();
    for (i, name) in ["ann", "ben", "cat", "dan", "eve"].iter().enumerate() {
        clients.push(
            Client::join(&server, name, "five", i as u8 + 1, true)
                .await
                .unwrap(),
        );
    }
    wait_for_media(&clients, 100, 60, Duration::from_secs(45)).await;
    verify_all(&clients);

    // Eve's laptop lid shuts: no leave message, no close, just silence.
    let eve = clients.pop().unwrap();
    let eve_id = eve.participant_id.clone();
    let _socket_kept_open = eve.vanish().await;
    let gone = Instant::now();
    wait_for(
        "the others to see eve leave",
        Duration::from_secs(15),
        || {
            clients.iter().all(|c| {
                c.saw(|e| e["type"] == "participant_left" && e["participant_id"] == eve_id.as_str())
            })
        },
    )
    .await;
    eprintln!("vanished participant removed after {:?}", gone.elapsed());

    // The remaining four keep flowing.
    let before: Vec<usize> = clients
        .iter()
        .map(|c| {
            c.received(&clients[(c.index as usize) % 4].participant_id, Kind::Audio)
                .packets
                .len()
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (c, b) in clients.iter().zip(before) {
        let now = c
            .received(&clients[(c.index as usize) % 4].participant_id, Kind::Audio)
            .packets
            .len();
        assert!(
            now > b + 20,
            "{}: media stopped after eve left ({b} → {now})",
            c.name
        );
    }
    let room = server.state.sfu.room("five").unwrap();
    assert_eq!(room.participant_count(), 4);
}

/// H.264 and VP9 are forwarded like VP8 when both sides support them, and
/// the published track says which codec it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h264_and_vp9_are_forwarded() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    for (room, codec) in [("h264-room", "video/H264"), ("vp9-room", "video/VP9")] {
        let mut clients = Vec::new();
        for (i, name) in ["hana", "ivan"].iter().enumerate() {
            let token = server.token(name, room);
            let c = Client::join_publishing(&server, name, &token, i as u8 + 1, Some(codec))
                .await
                .unwrap();
            clients.push(c);
        }
        wait_for_media(&clients, 50, 30, Duration::from_secs(30)).await;
        verify_all(&clients);
        let codecs: Vec<String> = server
            .state
            .sfu
            .room(room)
            .unwrap()
            .tracks()
            .iter()
            .map(|t| t.info.codec.clone())
            .collect();
        assert!(
            codecs.contains(&codec.to_ascii_lowercase()),
            "{room}: published codecs {codecs:?}"
        );
        for c in clients {
            c.leave().await;
        }
    }
}
