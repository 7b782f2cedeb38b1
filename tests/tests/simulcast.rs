//! Simulcast through the SFU with real VP8 in two layers (160×120 as `h`,
//! 320×240 as `f`): a receiver gets the larger one; a receiver that loses a
//! quarter of its video, or whose link is too slow for the larger one, is
//! moved to the smaller one.

use confer_tests::{
    Client, Kind, LastHop, RealMedia, TestServer, init_logging, vp8_keyframe_width,
    vp8_small_test_frames, vp8_test_frames,
};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bo joins `room` publishing a tone and real VP8 in two layers.
async fn bo_in_two_layers(server: &TestServer, room: &str) -> Client {
    let small = Arc::new(vp8_small_test_frames(2).unwrap());
    let big = Arc::new(vp8_test_frames(2).unwrap());
    let media = RealMedia::simulcast(440.0, small, big);
    Client::join_real(server, "bo", &server.token("bo", room), 1, media)
        .await
        .unwrap()
}

/// Waits until `clean`'s last keyframes from `bo` are 320 px wide and
/// `other`'s 160 px.
async fn settle(bo: &Client, clean: &Client, other: &Client, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, o) = (
            keyframe_widths(clean, &bo.participant_id),
            keyframe_widths(other, &bo.participant_id),
        );
        if settled(&c, 320) && settled(&o, 160) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "keyframe widths: clean {c:?}, {what} {o:?} (dropped {})",
            other.dropped_video()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_losing_packets_gets_the_smaller_layer() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let bo = bo_in_two_layers(&server, "layers").await;
    let cy = Client::join(&server, "cy", "layers", 2, true)
        .await
        .unwrap();
    // Ann loses every 4th video packet she receives (resends get through).
    let ann = Client::join_dropping_video(&server, "ann", "layers", 3, 4)
        .await
        .unwrap();

    settle(&bo, &cy, &ann, "lossy").await;
    assert!(
        ann.dropped_video() > 20,
        "the lossy hop dropped only {}",
        ann.dropped_video()
    );
}

/// Widths of the keyframes `c` got from `publisher`, in arrival order.
fn keyframe_widths(c: &Client, publisher: &str) -> Vec<u16> {
    c.received(publisher, Kind::Video)
        .packets
        .iter()
        .filter_map(|(_, p)| vp8_keyframe_width(p))
        .collect()
}

/// The last three keyframes were `want` wide.
fn settled(widths: &[u16], want: u16) -> bool {
    widths.len() >= 3 && widths[widths.len() - 3..].iter().all(|&x| x == want)
}

/// Ann's link carries 250 kbit/s: the small layer and the sound (~150k)
/// fit, the big layer and the sound (~300k) do not. Its buffer is deep, so
/// nothing is lost: only the delay grows, and only the SFU's bandwidth
/// estimate (from Ann's congestion feedback) can notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_behind_a_slow_link_gets_the_layer_that_fits() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let bo = bo_in_two_layers(&server, "slow").await;
    let cy = Client::join(&server, "cy", "slow", 2, false).await.unwrap();
    let hop = LastHop::Bottleneck {
        bits_per_second: 250_000,
        buffer: Duration::from_secs(30),
    };
    let ann = Client::join_behind(&server, "ann", "slow", 3, hop)
        .await
        .unwrap();

    settle(&bo, &cy, &ann, "slow").await;
    assert_eq!(ann.dropped_video(), 0, "the slow link should only delay");
    // Still flowing, and still heard.
    let before = ann.received(&bo.participant_id, Kind::Video).packets.len();
    let heard = ann.received(&bo.participant_id, Kind::Audio).packets.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(ann.received(&bo.participant_id, Kind::Video).packets.len() > before + 10);
    assert!(ann.received(&bo.participant_id, Kind::Audio).packets.len() > heard + 25);
}

/// Ann's link carries 110 kbit/s: Bo's sound fits, no video layer does. The
/// server stops sending her the video, tells her so, and the sound gets
/// through. When her link clears, the video comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn video_that_fits_no_layer_is_paused_until_the_link_clears() {
    paused_until_the_link_clears(false).await;
}

/// The same, with Ann receiving on a downlink of her own: its congestion
/// feedback feeds the same estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_downlink_too_video_that_fits_no_layer_is_paused_until_the_link_clears() {
    paused_until_the_link_clears(true).await;
}

async fn paused_until_the_link_clears(on_downlink: bool) {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let bo = bo_in_two_layers(&server, "thin").await;
    let hop = LastHop::Bottleneck {
        bits_per_second: 110_000,
        buffer: Duration::from_secs(30),
    };
    let ann = match on_downlink {
        true => Client::join_downlink(&server, "ann", "thin", 2, false, hop).await,
        false => Client::join_behind(&server, "ann", "thin", 2, hop).await,
    }
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let paused = loop {
        if let Some(e) = ann.events_of("video_paused").first() {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no video_paused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["reason"], "bandwidth");
    let track = paused["track_id"].as_str().unwrap();
    assert!(track.starts_with(&bo.participant_id), "{track}");
    // What an operator sees (the admin API's room view).
    let seen = downlink(&server, "thin", &ann);
    assert!(
        seen["estimate_bps"]
            .as_u64()
            .is_some_and(|bps| bps < 1_000_000),
        "{seen}"
    );
    let paused_for_ann = |seen: &Value| {
        seen["receiving"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["track_id"] == track && r["paused"] == true)
    };
    assert!(paused_for_ann(&seen), "{seen}");

    // Once the queue has drained, sound arrives (50 packets a second) and
    // video does not.
    let count = |kind| ann.received(&bo.participant_id, kind).packets.len();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (video, audio) = (count(Kind::Video), count(Kind::Audio));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (video, audio) = (count(Kind::Video) - video, count(Kind::Audio) - audio);
        if audio >= 40 && video < 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sound should go on and video stop: {audio} audio and {video} video packets in the last second"
        );
    }

    // The link clears. The estimate can only grow with what is sent, so
    // the video comes back when the hold after the pause ends and the
    // estimate has crept up to its smallest layer: within seconds.
    ann.set_link_rate(50_000_000);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ann
        .events_of("video_paused")
        .iter()
        .any(|e| e["paused"] == false)
    {
        assert!(Instant::now() < deadline, "the video did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let video = count(Kind::Video);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(count(Kind::Video) > video + 10, "video should flow again");
    let seen = downlink(&server, "thin", &ann);
    assert!(!paused_for_ann(&seen), "{seen}");
}

/// `who`'s downlink as the admin API shows it.
fn downlink(server: &TestServer, room: &str, who: &Client) -> Value {
    let room = server.sfu().room(room).expect("the room");
    let summary = serde_json::to_value(room.summary()).unwrap();
    summary["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == who.participant_id.as_str())
        .expect("the participant")["downlink"]
        .clone()
}
