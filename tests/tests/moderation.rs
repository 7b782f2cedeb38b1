//! Moderation is the schedule's to grant and the server's to check: the
//! organizer mutes (enforced by the SFU even against a client that ignores
//! the request), removes and ends; a participant cannot. A meeting past its
//! end plus grace warns everyone and closes.

use chrono::{Duration as Span, Utc};
use confer_signaling::schedule::Meeting;
use confer_signaling::schedule::local::LocalMeeting;
use confer_signaling::token::JoinKind;
use confer_tests::{Client, Kind, TestServer, claims, init_logging};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn schedule(server: &TestServer, room: &str, start: Span, end: Span) {
    let now = Utc::now();
    server
        .state
        .local_meetings
        .as_ref()
        .expect("local schedule")
        .add(LocalMeeting {
            room: room.into(),
            meeting: Meeting {
                title: format!("Meeting {room}"),
                start: now + start,
                end: now + end,
                status: Default::default(),
                organizer: Some("user-mod".into()),
                invitees: vec![],
                open: true,
            },
        })
        .await
        .unwrap();
}

async fn join(server: &TestServer, name: &str, room: &str, index: u8) -> Client {
    let token = server.mint(claims(name, room, JoinKind::Meeting));
    Client::join_with(server, name, &token, index, true)
        .await
        .unwrap()
}

async fn until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(c: &Client, from: &Client, kind: Kind) -> usize {
    c.received(&from.participant_id, kind).packets.len()
}

fn saw_type(c: &Client, ty: &str) -> Option<Value> {
    c.events_of(ty).pop()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderators_mute_remove_and_end_participants_cannot() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    schedule(&server, "board", Span::minutes(-1), Span::hours(1)).await;
    let moderator = join(&server, "mod", "board", 1).await;
    let p1 = join(&server, "p1", "board", 2).await;
    let p2 = join(&server, "p2", "board", 3).await;
    until(
        "media from p1 to the moderator",
        Duration::from_secs(20),
        || count(&moderator, &p1, Kind::Audio) > 20 && count(&moderator, &p1, Kind::Video) > 20,
    )
    .await;

    // A participant may not moderate.
    p1.send(json!({"type": "remove_participant", "participant_id": p2.participant_id}));
    p1.send(json!({"type": "end_meeting"}));
    until("two forbidden errors", Duration::from_secs(5), || {
        p1.events_of("error")
            .iter()
            .filter(|v| v["code"] == "forbidden")
            .count()
            == 2
    })
    .await;

    // The moderator mutes p1. The test client ignores the request and keeps
    // sending, so silence at the receivers is the SFU's doing.
    moderator.send(
        json!({"type": "mute_participant", "participant_id": p1.participant_id, "kind": "audio"}),
    );
    until("p1 told it was muted", Duration::from_secs(5), || {
        saw_type(&p1, "muted_by_moderator").is_some()
    })
    .await;
    until("p2 sees p1 muted", Duration::from_secs(5), || {
        p2.saw(|v| {
            v["type"] == "mute"
                && v["participant_id"] == p1.participant_id.as_str()
                && v["muted"] == true
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // packets in flight
    let audio = count(&moderator, &p1, Kind::Audio);
    let video = count(&moderator, &p1, Kind::Video);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        count(&moderator, &p1, Kind::Audio),
        audio,
        "muted audio still forwarded"
    );
    assert!(
        count(&moderator, &p1, Kind::Video) > video + 10,
        "video must keep flowing"
    );

    // p1 unmutes itself: its audio flows again.
    p1.send(json!({"type": "mute", "kind": "audio", "muted": false}));
    until("p1's audio back", Duration::from_secs(5), || {
        count(&moderator, &p1, Kind::Audio) > audio + 20
    })
    .await;

    // Unknown target, video mute: clear errors.
    moderator.send(json!({"type": "remove_participant", "participant_id": "nobody"}));
    moderator.send(
        json!({"type": "mute_participant", "participant_id": p1.participant_id, "kind": "video"}),
    );
    until(
        "errors for a bad target and a video mute",
        Duration::from_secs(5),
        || {
            moderator.saw(|v| v["code"] == "unknown_participant")
                && moderator.saw(|v| v["code"] == "bad_message")
        },
    )
    .await;

    // Removal.
    moderator.send(json!({"type": "remove_participant", "participant_id": p2.participant_id}));
    until("p2 removed", Duration::from_secs(5), || {
        p2.saw(|v| v["type"] == "removed" && v["reason"] == "removed_by_moderator")
    })
    .await;
    until("the others told", Duration::from_secs(5), || {
        p1.saw(|v| {
            v["type"] == "participant_left" && v["participant_id"] == p2.participant_id.as_str()
        })
    })
    .await;

    // End for all.
    moderator.send(json!({"type": "end_meeting"}));
    until("p1 told the meeting ended", Duration::from_secs(5), || {
        p1.saw(|v| v["type"] == "removed" && v["reason"] == "ended_by_moderator")
    })
    .await;
    until("the room is gone", Duration::from_secs(5), || {
        server.sfu().room("board").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meeting_past_its_end_warns_and_closes() {
    init_logging();
    let server = TestServer::start_with(|c| {
        c.schedule.grace = Duration::from_secs(1);
        c.schedule.warn_before_close = Duration::from_secs(2);
    })
    .await
    .unwrap();
    schedule(&server, "short", Span::minutes(-1), Span::seconds(6)).await;
    let a = join(&server, "ann", "short", 1).await;
    let b = join(&server, "ben", "short", 2).await;
    let joined_at = Instant::now();
    until("the closing warning", Duration::from_secs(10), || {
        saw_type(&a, "meeting_ending").is_some()
    })
    .await;
    let warning = saw_type(&b, "meeting_ending").expect("everyone is warned");
    assert!(warning["closes_at"].as_str().unwrap().ends_with('Z'));
    until(
        "removal at the end plus grace",
        Duration::from_secs(10),
        || {
            a.saw(|v| v["type"] == "removed" && v["reason"] == "meeting_ended")
                && b.saw(|v| v["type"] == "removed" && v["reason"] == "meeting_ended")
        },
    )
    .await;
    // End in 6 s plus 1 s grace, counted from before the joins.
    let closed_after = joined_at.elapsed();
    assert!(
        closed_after > Duration::from_millis(500),
        "closed too early: {closed_after:?}"
    );

    // Too late to join now.
    let mut late = confer_tests::Signal::connect(&server.ws_url())
        .await
        .unwrap();
    late.send(
        json!({"type": "join", "token": server.mint(claims("cy", "short", JoinKind::Meeting))}),
    );
    let err = late.expect("error", Duration::from_secs(5)).await.unwrap();
    assert_eq!(err["code"], "meeting_ended");
}
