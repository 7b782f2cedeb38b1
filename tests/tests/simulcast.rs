//! Simulcast through the SFU with real VP8 in two layers (160×120 as `h`,
//! 320×240 as `f`): a receiver gets the larger one, and a receiver that loses
//! a quarter of its video is moved to the smaller one.

use confer_tests::{
    Client, Kind, RealMedia, TestServer, init_logging, vp8_keyframe_width, vp8_small_test_frames,
    vp8_test_frames,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_losing_packets_gets_the_smaller_layer() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let small = Arc::new(vp8_small_test_frames(2).unwrap());
    let big = Arc::new(vp8_test_frames(2).unwrap());
    let media = RealMedia::simulcast(440.0, small, big);
    let bo = Client::join_real(&server, "bo", &server.token("bo", "layers"), 1, media)
        .await
        .unwrap();
    let cy = Client::join(&server, "cy", "layers", 2, true)
        .await
        .unwrap();
    // Ann loses every 4th video packet she receives (resends get through).
    let ann = Client::join_dropping_video(&server, "ann", "layers", 3, 4)
        .await
        .unwrap();

    // Widths of the keyframes a client got from Bo, in arrival order.
    let widths = |c: &Client| -> Vec<u16> {
        c.received(&bo.participant_id, Kind::Video)
            .packets
            .iter()
            .filter_map(|(_, p)| vp8_keyframe_width(p))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (c, a) = (widths(&cy), widths(&ann));
        let settled =
            |w: &[u16], want: u16| w.len() >= 3 && w[w.len() - 3..].iter().all(|&x| x == want);
        if settled(&c, 320) && settled(&a, 160) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keyframe widths: clean {c:?}, lossy {a:?} (dropped {})",
            ann.dropped_video()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ann.dropped_video() > 20,
        "the lossy hop dropped only {}",
        ann.dropped_video()
    );
}
