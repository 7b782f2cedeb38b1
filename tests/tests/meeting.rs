//! Participants join a room over loopback with real WebRTC, publish audio
//! and video, and receive everyone else's media intact and in order.

use confer_tests::{
    Client, Kind, Signal, TestServer, check_payload, init_logging, verify_stream, wait_for,
};
use serde_json::json;
use std::time::{Duration, Instant};

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

/// With `udp_mux` off, each participant's media has a port of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_per_participant_still_works() {
    init_logging();
    let server = TestServer::start_with(|c| c.sfu.udp_mux = false)
        .await
        .unwrap();
    assert_eq!(server.sfu().media_port(), None);
    let a = Client::join(&server, "alice", "ports", 1, true)
        .await
        .unwrap();
    let b = Client::join(&server, "bob", "ports", 2, true)
        .await
        .unwrap();
    let clients = [a, b];
    wait_for_media(&clients, 100, 60, Duration::from_secs(30)).await;
    verify_all(&clients);
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
    let room = server.sfu().room("five").unwrap();
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
            .sfu()
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

/// Packets of `publisher` with payload index `index` that `c` received.
fn count_from(c: &Client, publisher: &Client, kind: Kind, index: u8) -> usize {
    c.received(&publisher.participant_id, kind)
        .packets
        .iter()
        .filter(|(_, p)| check_payload(p).is_some_and(|(i, _, _)| i == index))
        .count()
}

/// Both sides offer at once (glare): the SFU's offer wins, the client rolls
/// its own back, answers, and offers again; nothing is lost either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_offers_are_resolved() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let mut clients = Vec::new();
    for (i, name) in ["alice", "bob"].iter().enumerate() {
        let c = Client::join(&server, name, "glare", i as u8 + 1, true);
        clients.push(c.await.unwrap());
    }
    wait_for_media(&clients, 20, 10, Duration::from_secs(30)).await;

    // Bob starts a second video (a screen, say) and offers it just as Carol
    // joins, so the SFU's offer carrying Carol's tracks crosses Bob's.
    const SCREEN: u8 = 12;
    clients[1].hold_offer_with_video(SCREEN).await.unwrap();
    clients.push(
        Client::join(&server, "carol", "glare", 3, true)
            .await
            .unwrap(),
    );

    wait_for_media(&clients, 50, 30, Duration::from_secs(30)).await;
    let (alice, bob, carol) = (&clients[0], &clients[1], &clients[2]);
    // (wait_for_media above: Carol's tracks reached Bob through the offer that won.)
    wait_for(
        "bob's screen at alice and carol",
        Duration::from_secs(20),
        || {
            [alice, carol]
                .iter()
                .all(|c| count_from(c, bob, Kind::Video, SCREEN) >= 30)
        },
    )
    .await;
    assert!(bob.rollbacks() >= 1, "the offers never crossed");
    let errors = bob.events_of("error");
    assert!(errors.is_empty(), "bob got errors: {errors:?}");
}

/// Video a receiver loses on its last hop is resent by the SFU when the
/// receiver's NACK asks for it, so every packet arrives in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_video_is_resent_on_nack() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let alice = Client::join(&server, "alice", "nack", 1, true)
        .await
        .unwrap();
    let lossy = Client::join_dropping_video(&server, "bob", "nack", 2, 10)
        .await
        .unwrap();
    let clients = [alice, lossy];
    wait_for_media(&clients, 100, 90, Duration::from_secs(30)).await;
    let (alice, lossy) = (&clients[0], &clients[1]);

    // Everything up to now, once resends in flight have landed.
    let first = lossy.received(&alice.participant_id, Kind::Video);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        lossy.dropped_video() >= 8,
        "only {} packets were dropped",
        lossy.dropped_video()
    );
    let counters = |r: &confer_tests::Received| -> std::collections::BTreeSet<u32> {
        r.packets
            .iter()
            .filter_map(|(_, p)| check_payload(p).map(|(_, _, n)| n))
            .collect()
    };
    let (lo, hi) = {
        let c = counters(&first);
        (*c.first().unwrap(), *c.last().unwrap())
    };
    let now = counters(&lossy.received(&alice.participant_id, Kind::Video));
    let missing: Vec<u32> = (lo..=hi).filter(|n| !now.contains(n)).collect();
    assert!(missing.is_empty(), "never resent: {missing:?}");
    // Intact and in order; a gap or two at the newest edge may still be
    // waiting for its resend.
    verify_stream(
        &lossy.received(&alice.participant_id, Kind::Video),
        alice.index,
        Kind::Video,
        3,
    )
    .unwrap();
}

/// A tile scrolled out of sight asks for no video (`video_quality: off`)
/// and gets it back later: the packets it was not sent are not a gap, so
/// its browser has nothing to ask again for and nothing to count as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_tile_gets_its_video_back_without_a_gap() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let ann = Client::join(&server, "ann", "tiles", 1, true)
        .await
        .unwrap();
    let bo = Client::join(&server, "bo", "tiles", 2, true).await.unwrap();
    let video = || ann.received(&bo.participant_id, Kind::Video).packets;
    wait_for("bo's video", Duration::from_secs(20), || video().len() > 30).await;
    let track = server
        .sfu()
        .room("tiles")
        .unwrap()
        .tracks()
        .into_iter()
        .find(|t| t.publisher == bo.participant_id && t.info.kind == confer_sfu::TrackKind::Video)
        .unwrap()
        .info
        .id
        .clone();
    let quality = |q: &str| json!({"type": "video_quality", "track_id": track, "quality": q});

    ann.send(quality("off"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = video().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(video().len() < before + 3, "video should stop while hidden");
    ann.send(quality("high"));
    wait_for("bo's video again", Duration::from_secs(10), || {
        video().len() > before + 30
    })
    .await;

    let seqs: Vec<u16> = video().iter().map(|(seq, _)| *seq).collect();
    let widest = seqs
        .windows(2)
        .map(|w| w[1].wrapping_sub(w[0]))
        .filter(|d| *d < 0x8000) // reordering, not a gap
        .max()
        .unwrap();
    assert!(widest <= 2, "a gap of {widest} sequence numbers");
}

/// The SFU's first answer carries its candidate, and no candidate comes
/// before it: a client can check the SFU's address as soon as it has the
/// answer. Otherwise it first learns the SFU from the SFU's own check, as
/// a peer-reflexive candidate, which pion- and webrtc-rs-based clients wait
/// a second before they nominate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_answer_carries_the_sfu_candidate() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let sdp = confer_tests::recvonly_video_offer(1).await.unwrap();
    let mut s = Signal::connect(&server.ws_url()).await.unwrap();
    s.send(json!({"type": "join", "token": server.token("cand", "ann")}));
    s.expect("joined", Duration::from_secs(10)).await.unwrap();
    s.send(json!({"type": "offer", "sdp": sdp}));
    let (before, answer) = s
        .skipping_until("answer", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        before.iter().all(|m| m["type"] != "candidate"),
        "a candidate overtook the answer: {before:?}"
    );
    let sdp = answer["sdp"].as_str().unwrap();
    let candidate = sdp.lines().find(|l| l.starts_with("a=candidate:"));
    assert!(
        candidate.is_some_and(|c| c.contains("127.0.0.1") && c.contains("typ host")),
        "no host candidate in the answer:\n{sdp}"
    );
    // Every participant's media goes to the one shared port.
    let port = server.sfu().media_port().unwrap().to_string();
    let named: Vec<&str> = sdp
        .lines()
        .filter(|l| l.starts_with("a=candidate:"))
        .map(|l| l.split(' ').nth(5).unwrap())
        .collect();
    assert!(
        !named.is_empty() && named.iter().all(|p| *p == port),
        "candidates name ports {named:?}, not the shared {port}:\n{sdp}"
    );
}

/// A room with more open microphones than `sfu.audio_last_n` forwards only
/// the loudest; one that gets louder takes the place of the quietest of
/// them, and video is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_loudest_microphones_are_forwarded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU8, Ordering};
    init_logging();
    let server = TestServer::start_with(|c| c.sfu.audio_last_n = 2)
        .await
        .unwrap();
    // dBov: 0 is full scale, 127 silence. Ann and Bo talk; Cy and Di are
    // open microphones in quieter rooms.
    let levels: Vec<Arc<AtomicU8>> = [20, 30, 60, 70]
        .into_iter()
        .map(|l| Arc::new(AtomicU8::new(l)))
        .collect();
    let mut speakers = Vec::new();
    for (i, name) in ["ann", "bo", "cy", "di"].into_iter().enumerate() {
        let level = levels[i].clone();
        let c = Client::join_speaking(&server, name, "loud", i as u8 + 1, level);
        speakers.push(c.await.unwrap());
    }
    let lu = Client::join(&server, "lu", "loud", 9, false).await.unwrap();
    wait_for("everyone's video", Duration::from_secs(20), || {
        speakers
            .iter()
            .all(|s| lu.received(&s.participant_id, Kind::Video).packets.len() > 30)
    })
    .await;

    // What Lu hears of each in two seconds (50 packets/s each), once the
    // levels have settled.
    let heard_over_two_seconds = async || {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let count = || {
            speakers
                .iter()
                .map(|s| lu.received(&s.participant_id, Kind::Audio).packets.len())
                .collect::<Vec<_>>()
        };
        let before = count();
        tokio::time::sleep(Duration::from_secs(2)).await;
        count()
            .iter()
            .zip(before)
            .map(|(after, before)| after - before)
            .collect::<Vec<_>>()
    };
    let heard = heard_over_two_seconds().await;
    assert!(heard[0] > 70 && heard[1] > 70, "the two loudest: {heard:?}");
    assert_eq!(heard[2..], [0, 0], "the quieter ones: {heard:?}");
    // The admin view says so, for Lu.
    let room = server.sfu().room("loud").unwrap().summary();
    let lu_row = room
        .participants
        .iter()
        .find(|p| p.summary.id == lu.participant_id)
        .unwrap();
    let left_out = |who: &Client| {
        let audio = format!("{}-", who.participant_id);
        lu_row
            .downlink
            .receiving
            .iter()
            .filter(|r| r.track_id.starts_with(&audio))
            .any(|r| r.left_out)
    };
    let shown: Vec<bool> = speakers.iter().map(left_out).collect();
    assert_eq!(shown, [false, false, true, true]);

    // Di starts talking, louder than anyone: she is heard, and Bo, now the
    // third loudest, is not.
    levels[3].store(10, Ordering::Relaxed);
    let heard = heard_over_two_seconds().await;
    assert!(heard[0] > 70 && heard[3] > 70, "Ann and Di: {heard:?}");
    assert_eq!([heard[1], heard[2]], [0, 0], "Bo and Cy: {heard:?}");
    // Video never depended on it.
    for s in &speakers {
        let before = lu.received(&s.participant_id, Kind::Video).packets.len();
        wait_for("video still flowing", Duration::from_secs(5), || {
            lu.received(&s.participant_id, Kind::Video).packets.len() > before + 10
        })
        .await;
    }
}
