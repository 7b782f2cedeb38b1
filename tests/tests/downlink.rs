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

/// The uplink asks for what went missing: a publisher on a downlink that
/// loses every 10th video packet it sends gets NACKs, resends them on RTX,
/// and the receiver gets every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_packets_on_an_uplink_are_asked_for_again() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let publisher = Client::join_downlink(
        &server,
        "pub",
        "lossy-up",
        1,
        true,
        LastHop::DropSentVideo(10),
    )
    .await
    .unwrap();
    let receiver = Client::join_downlink(&server, "rx", "lossy-up", 2, false, LastHop::Clean)
        .await
        .unwrap();
    wait_for(
        "video through a lossy first hop",
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
        publisher.dropped_video() >= 10,
        "dropped {}",
        publisher.dropped_video()
    );
    // Every packet up to now, once the resends of the newest have had a
    // second to come.
    let upto = receiver
        .received(&publisher.participant_id, Kind::Video)
        .packets
        .len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut video = receiver.received(&publisher.participant_id, Kind::Video);
    let first = video.packets[0].0;
    let last = video.packets[..upto]
        .iter()
        .map(|(seq, _)| seq.wrapping_sub(first))
        .max()
        .unwrap();
    video
        .packets
        .retain(|(seq, _)| seq.wrapping_sub(first) <= last);
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
    forged_checks_are_not_answered(&server, &offer);

    let before = audio();
    wait_for("audio still coming", Duration::from_secs(10), || {
        audio() >= before + 50
    })
    .await;
}

/// A participant on a downlink publishes on the server's own uplink. Broken
/// and hostile offers on it get `bad_sdp` and change nothing; forged checks
/// naming it are not answered; what it publishes keeps coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_offers_on_an_uplink_are_refused_and_its_media_keeps_flowing() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let publisher = Client::join_downlink(&server, "pub", "uplink", 1, true, LastHop::Clean)
        .await
        .unwrap();
    let viewer = Client::join_downlink(&server, "viewer", "uplink", 9, false, LastHop::Clean)
        .await
        .unwrap();
    let audio = || {
        viewer
            .received(&publisher.participant_id, Kind::Audio)
            .packets
            .len()
    };
    wait_for("the publisher's audio", Duration::from_secs(30), || {
        audio() >= 50
    })
    .await;
    let answer = publisher.events_of("answer").last().unwrap()["sdp"]
        .as_str()
        .unwrap()
        .to_owned();
    // The server's own uplink: ICE-lite, it is the DTLS server.
    assert!(answer.contains("a=ice-lite\r\n"), "{answer}");
    assert!(answer.contains("a=setup:passive\r\n"), "{answer}");

    let session = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
                   a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
                   a=fingerprint:sha-256 AA:BB\r\n";
    let garbage = [
        "this is not SDP".to_owned(),
        // The sections it publishes on, gone.
        format!(
            "{session}a=setup:actpass\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:other\r\n\
             a=sendonly\r\na=rtpmap:111 opus/48000/2\r\n"
        ),
        // The server cannot be the DTLS client here.
        format!("{session}a=setup:passive\r\n"),
        format!("{session}a=setup:actpass\r\n")
            + &"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:x\r\n".repeat(100),
    ];
    for sdp in &garbage {
        publisher.send(json!({"type": "offer", "sdp": sdp}));
    }
    wait_for("four refusals", Duration::from_secs(10), || {
        publisher.events_of("error").len() >= 4
    })
    .await;
    let messages: Vec<String> = publisher
        .events_of("error")
        .iter()
        .map(|e| {
            assert_eq!(e["code"], "bad_sdp", "{e}");
            e["message"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert!(messages[1].contains("missing or moved"), "{messages:?}");
    assert!(messages[2].contains("DTLS server"), "{messages:?}");
    assert!(
        messages[3].contains("too many media sections"),
        "{messages:?}"
    );

    forged_checks_are_not_answered(&server, &answer);

    let before = audio();
    wait_for("audio still coming", Duration::from_secs(10), || {
        audio() >= before + 50
    })
    .await;
    let video = viewer.received(&publisher.participant_id, Kind::Video);
    verify_stream(&video, 1, Kind::Video, 0).unwrap();
}

/// Sends checks naming the ufrag of `description` with a guessed password,
/// and RTP and DTLS from an address no check proved: none is answered.
fn forged_checks_are_not_answered(server: &TestServer, description: &str) {
    let ufrag = description
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
    let rtp = [0x80, 111, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
    let dtls = [22, 254, 253, 0, 0];
    for _ in 0..20 {
        for datagram in [&check[..], &rtp, &dtls] {
            forger.send_to(datagram, ("127.0.0.1", port)).unwrap();
        }
    }
    let mut buf = [0u8; 1500];
    assert!(
        forger.recv_from(&mut buf).is_err(),
        "a forged check was answered"
    );
}
