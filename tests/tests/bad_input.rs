//! Hostile and broken input gets a precise error code, and a meeting in the
//! same process keeps flowing throughout.

use confer_signaling::token::now_secs;
use confer_tests::{Client, Kind, Signal, TestServer, init_logging};
use serde_json::json;
use std::time::{Duration, Instant};

async fn error_code(sig: &mut Signal) -> String {
    let e = sig.expect("error", Duration::from_secs(10)).await.unwrap();
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {e}"
    );
    e["code"].as_str().unwrap().to_owned()
}

fn audio_from(c: &Client, from: &Client) -> usize {
    c.received(&from.participant_id, Kind::Audio).packets.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_the_meeting_keeps_flowing() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let a = Client::join(&server, "ann", "steady", 1, true)
        .await
        .unwrap();
    let b = Client::join(&server, "bob", "steady", 2, true)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while audio_from(&a, &b) < 50 || audio_from(&b, &a) < 50 {
        assert!(Instant::now() < deadline, "meeting never started flowing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = (audio_from(&a, &b), audio_from(&b, &a));

    let mut bad = Signal::connect(&server.ws_url()).await.unwrap();
    bad.send_raw("{not json".into());
    assert_eq!(error_code(&mut bad).await, "bad_json");
    bad.send(json!({"type": "teleport"}));
    assert_eq!(error_code(&mut bad).await, "unknown_type");
    bad.send(json!({"no_type": 1}));
    assert_eq!(error_code(&mut bad).await, "bad_message");
    bad.send(json!({"type": "offer", "sdp": "v=0"}));
    assert_eq!(error_code(&mut bad).await, "not_joined");
    bad.send_raw(format!(
        "{{\"type\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(100 * 1024)
    ));
    assert_eq!(error_code(&mut bad).await, "message_too_large");
    bad.send(json!({"type": "join", "token": "garbage.token.here"}));
    assert_eq!(error_code(&mut bad).await, "token_invalid");
    bad.send(
        json!({"type": "join", "token": server.token_with("eve", "steady", now_secs() - 3600)}),
    );
    assert_eq!(error_code(&mut bad).await, "token_expired");
    bad.send(json!({"type": "join", "token": server.token("eve", "other-room"), "room": "steady"}));
    assert_eq!(error_code(&mut bad).await, "wrong_room");

    // Joined for real, then garbage SDP and candidates.
    bad.send(json!({"type": "join", "token": server.token("eve", "steady")}));
    bad.expect("joined", Duration::from_secs(10)).await.unwrap();
    bad.send(json!({"type": "offer", "sdp": "this is not SDP"}));
    assert_eq!(error_code(&mut bad).await, "bad_sdp");
    bad.send(json!({"type": "answer", "sdp": "v=0\r\n"}));
    assert_eq!(error_code(&mut bad).await, "bad_sdp");
    bad.send(json!({"type": "candidate", "candidate": {"candidate": "candidate:garbage", "sdpMid": "0"}}));
    assert_eq!(error_code(&mut bad).await, "bad_candidate");
    // A good candidate that overtook the offer is kept for it, not refused.
    let early = "candidate:1 1 udp 2122260223 127.0.0.1 54321 typ host";
    bad.send(json!({"type": "candidate", "candidate": {"candidate": early, "sdpMid": "0"}}));
    bad.send(json!({"type": "ping"}));
    let (before_pong, _) = bad
        .skipping_until("pong", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(before_pong.is_empty(), "{before_pong:?}");
    bad.send(json!({"type": "mute", "kind": "smell", "muted": true}));
    assert_eq!(error_code(&mut bad).await, "bad_message");
    bad.send(json!({"type": "video_quality", "track_id": "nobody-nothing", "quality": "low"}));
    assert_eq!(error_code(&mut bad).await, "unknown_track");
    bad.send(json!({"type": "video_quality", "track_id": "nobody-nothing", "quality": "8k"}));
    assert_eq!(error_code(&mut bad).await, "bad_message");
    bad.send(json!({"type": "join", "token": server.token("eve", "steady")}));
    assert_eq!(error_code(&mut bad).await, "already_joined");
    // Still answered after all that.
    bad.send(json!({"type": "ping"}));
    bad.expect("pong", Duration::from_secs(5)).await.unwrap();

    // Garbage at the shared media port from an address no participant
    // uses: connectivity checks naming nobody, torn ones, RTP- and
    // DTLS-looking bytes, and a flood of them.
    let port = server.sfu().media_port().expect("one media port");
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut check = vec![0, 1, 0, 12, 0x21, 0x12, 0xA4, 0x42];
    check.extend_from_slice(&[9; 12]);
    check.extend_from_slice(&[0, 6, 0, 8]);
    check.extend_from_slice(b"nobody:x");
    for i in 0..3000usize {
        let datagram = match i % 5 {
            0 => check.clone(),
            1 => check[..i % check.len()].to_vec(),
            2 => vec![0x80; 1200],
            3 => vec![22, 254, 253, 0, 0],
            _ => (i as u32).to_be_bytes().repeat(100),
        };
        junk.send_to(&datagram, ("127.0.0.1", port)).await.unwrap();
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = (audio_from(&a, &b), audio_from(&b, &a));
    assert!(
        after.0 > before.0 + 20 && after.1 > before.1 + 20,
        "meeting stalled: {before:?} → {after:?}"
    );
}

/// A large meeting's SDP is larger than other messages may be: an offer of
/// 40 videos (over 64 KiB) is answered, not refused as too large.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_offer_is_answered() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let sdp = confer_tests::recvonly_video_offer(40).await.unwrap();
    assert!(sdp.len() > 64 * 1024, "only {} bytes", sdp.len());
    let mut s = Signal::connect(&server.ws_url()).await.unwrap();
    s.send(json!({"type": "join", "token": server.token("big", "large")}));
    s.expect("joined", Duration::from_secs(10)).await.unwrap();
    s.send(json!({"type": "offer", "sdp": sdp}));
    let answer = s.expect("answer", Duration::from_secs(10)).await.unwrap();
    let m_lines = answer["sdp"].as_str().unwrap().matches("m=video").count();
    assert_eq!(m_lines, 40);
}
