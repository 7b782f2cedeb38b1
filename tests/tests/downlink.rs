//! Participants that receive on a downlink of their own (`"downlink": true`
//! at join, `docs/signaling.md`) alongside ones that receive on their peer
//! connection: everyone gets everyone else's media, intact and in order.

use confer_tests::{Client, Kind, LastHop, TestServer, init_logging, verify_stream, wait_for};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_and_peer_connection_receivers_get_everyone() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let alice = Client::join(&server, "alice", "mixed", 1, true)
        .await
        .unwrap();
    let bob = Client::join_downlink(&server, "bob", "mixed", 2, true, LastHop::Clean)
        .await
        .unwrap();
    let carol = Client::join_downlink(&server, "carol", "mixed", 3, false, LastHop::Clean)
        .await
        .unwrap();
    let publishers = [&alice, &bob];
    let receivers = [&alice, &bob, &carol];
    wait_for(
        "media from every publisher",
        Duration::from_secs(30),
        || {
            receivers.iter().all(|r| {
                publishers
                    .iter()
                    .filter(|p| p.participant_id != r.participant_id)
                    .all(|p| {
                        r.received(&p.participant_id, Kind::Audio).packets.len() >= 100
                            && r.received(&p.participant_id, Kind::Video).packets.len() >= 60
                    })
            })
        },
    )
    .await;
    for r in receivers {
        for p in publishers
            .iter()
            .filter(|p| p.participant_id != r.participant_id)
        {
            for kind in [Kind::Audio, Kind::Video] {
                verify_stream(&r.received(&p.participant_id, kind), p.index, kind, 0)
                    .unwrap_or_else(|e| panic!("{} ← {} {kind:?}: {e}", r.name, p.name));
            }
        }
    }
    // The downlink carries what bob and carol receive; bob publishes on an
    // uplink of the server's own (ICE-lite), answered as a peer connection.
    assert!(bob.saw(|e| e["type"] == "downlink_offer"));
    assert!(!alice.saw(|e| e["type"] == "downlink_offer"));
}

/// A publisher leaving takes its sections off the downlink; one joining
/// later takes them over, and media keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_sections_follow_publishers_coming_and_going() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let viewer = Client::join_downlink(&server, "viewer", "flow", 9, false, LastHop::Clean)
        .await
        .unwrap();
    let first = Client::join(&server, "first", "flow", 1, true)
        .await
        .unwrap();
    wait_for(
        "the first publisher's video",
        Duration::from_secs(30),
        || {
            viewer
                .received(&first.participant_id, Kind::Video)
                .packets
                .len()
                >= 30
        },
    )
    .await;
    first.leave().await;
    // The viewer is told (and answers at once) that those sections went idle.
    wait_for(
        "the departed publisher's sections offered inactive",
        Duration::from_secs(10),
        || {
            viewer
                .events_of("downlink_offer")
                .iter()
                .any(|o| o["sdp"].as_str().unwrap_or("").contains("a=inactive"))
        },
    )
    .await;
    let second = Client::join(&server, "second", "flow", 2, true)
        .await
        .unwrap();
    wait_for(
        "the second publisher's media",
        Duration::from_secs(30),
        || {
            viewer
                .received(&second.participant_id, Kind::Video)
                .packets
                .len()
                >= 30
                && viewer
                    .received(&second.participant_id, Kind::Audio)
                    .packets
                    .len()
                    >= 50
        },
    )
    .await;
    for kind in [Kind::Audio, Kind::Video] {
        verify_stream(&viewer.received(&second.participant_id, kind), 2, kind, 0).unwrap();
    }
    let offers = viewer.events_of("downlink_offer");
    assert!(
        offers.len() >= 3,
        "offers: join, leave, join ({})",
        offers.len()
    );
    // The newcomer took over the departed publisher's sections: offers do
    // not grow with every departure.
    let last = offers.last().unwrap()["sdp"].as_str().unwrap();
    let sections: Vec<&str> = last.lines().filter(|l| l.starts_with("m=")).collect();
    assert_eq!(sections.len(), 2, "{last}");
    assert!(!last.contains("a=inactive"), "{last}");
}

/// NACKs on a downlink are answered: a receiver that loses every 10th video
/// packet still gets every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_packets_on_a_downlink_are_sent_again() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let publisher = Client::join(&server, "pub", "lossy", 1, true)
        .await
        .unwrap();
    let receiver = Client::join_downlink(&server, "rx", "lossy", 2, false, LastHop::DropVideo(10))
        .await
        .unwrap();
    wait_for(
        "video through a lossy last hop",
        Duration::from_secs(30),
        || {
            receiver
                .received(&publisher.participant_id, Kind::Video)
                .packets
                .len()
                >= 150
        },
    )
    .await;
    assert!(
        receiver.dropped_video() >= 10,
        "dropped {}",
        receiver.dropped_video()
    );
    let video = receiver.received(&publisher.participant_id, Kind::Video);
    verify_stream(&video, 1, Kind::Video, 0).unwrap();
}

/// Broken and hostile downlink answers get `bad_sdp` and change nothing;
/// forged checks naming the downlink are not answered; media keeps coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_downlink_answers_are_refused_and_the_downlink_keeps_flowing() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let viewer = Client::join_downlink(&server, "viewer", "hostile", 9, false, LastHop::Clean)
        .await
        .unwrap();
    let speaker = Client::join(&server, "speaker", "hostile", 1, true)
        .await
        .unwrap();
    let audio = || {
        viewer
            .received(&speaker.participant_id, Kind::Audio)
            .packets
            .len()
    };
    wait_for("the speaker's audio", Duration::from_secs(30), || {
        audio() >= 50
    })
    .await;
    let offer = viewer.events_of("downlink_offer").last().unwrap()["sdp"]
        .as_str()
        .unwrap()
        .to_owned();

    let garbage = [
        "this is not SDP".to_owned(),
        // No offer awaits an answer now: even a well-formed one is refused.
        offer.replace("a=sendonly", "a=recvonly"),
        "v=0\r\n".repeat(20_000),
    ];
    for sdp in &garbage {
        viewer.send(json!({"type": "downlink_answer", "sdp": sdp}));
    }
    wait_for("three refusals", Duration::from_secs(10), || {
        viewer.events_of("error").len() >= 3
    })
    .await;
    for e in viewer.events_of("error") {
        assert_eq!(e["code"], "bad_sdp", "{e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    // Not a downlink participant: nothing to answer.
    speaker.send(json!({"type": "downlink_answer", "sdp": offer}));
    wait_for("the speaker refused", Duration::from_secs(10), || {
        !speaker.events_of("error").is_empty()
    })
    .await;
    assert_eq!(speaker.events_of("error")[0]["code"], "bad_sdp");

    // Checks naming the downlink's ufrag with a guessed password.
    let ufrag = offer
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap()
        .trim()
        .to_owned();
    let port = server.sfu().media_port().expect("one media port");
    let forger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    forger
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut check = Vec::new();
    confer_transport::ice::connectivity_check(
        &format!("{ufrag}:forger"),
        b"guessed password",
        true,
        &[7; 12],
        &mut check,
    );
    for _ in 0..20 {
        forger.send_to(&check, ("127.0.0.1", port)).unwrap();
    }
    let mut buf = [0u8; 1500];
    assert!(
        forger.recv_from(&mut buf).is_err(),
        "a forged check was answered"
    );

    let before = audio();
    wait_for("audio still coming", Duration::from_secs(10), || {
        audio() >= before + 50
    })
    .await;
}
