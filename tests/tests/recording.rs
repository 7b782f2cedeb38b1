//! A recording of a real meeting: three participants speaking distinct
//! tones with VP8 video, one joining halfway; the file is checked with
//! ffprobe and ffmpeg, and its audio's spectrum says who was heard when.

use confer_recorder::recording::Settings;
use confer_recorder::store::{self, LocalStore, Store};
use confer_tests::{
    Client, Kind, RECORDER_SECRET, RealMedia, TestServer, h264_test_frames, init_logging,
    recorder_worker, vp8_test_frames,
};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("confer-{name}-{:016x}", rand::random::<u64>()))
}

async fn join(
    server: &TestServer,
    name: &str,
    index: u8,
    tone_hz: f64,
    vp8: &Arc<Vec<Vec<u8>>>,
) -> Client {
    let media = RealMedia::tone(tone_hz, vp8.clone());
    Client::join_real(server, name, &server.token(name, "recorded"), index, media)
        .await
        .unwrap()
}

/// Ann (440 Hz) and Ben (660 Hz) in room `recorded`, once Ben hears Ann.
async fn ann_and_ben_talking(server: &TestServer) -> (Client, Client) {
    let vp8 = Arc::new(vp8_test_frames(2).unwrap());
    let a = join(server, "ann", 1, 440.0, &vp8).await;
    let b = join(server, "ben", 2, 660.0, &vp8).await;
    until("media", Duration::from_secs(20), || {
        b.received(&a.participant_id, Kind::Audio).packets.len() > 30
    })
    .await;
    (a, b)
}

async fn until(what: &str, within: Duration, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (codec types and names, duration in seconds) from ffprobe.
fn probe(file: &Path) -> (Vec<String>, f64) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type,codec_name:format=duration",
            "-of",
            "json",
        ])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let streams = v["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["codec_type"].as_str().unwrap(),
                s["codec_name"].as_str().unwrap()
            )
        })
        .collect();
    let duration = v["format"]["duration"].as_str().unwrap().parse().unwrap();
    (streams, duration)
}

/// Decodes everything; FFmpeg must report no error.
///
/// The output keeps the file's millisecond time base: by default FFmpeg
/// rescales to a frame rate it guesses, and a low guess for variable-rate
/// video (20 fps for a browser's) makes distinct timestamps collide and
/// fail as "non monotonically increasing dts" although the file's are
/// strictly increasing. Real duplicates in the file still fail here.
fn decodes_cleanly(file: &Path) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-enc_time_base", "-1", "-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success());
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(errors.trim().is_empty(), "decoding errors: {errors}");
}

fn pcm(file: &Path) -> Vec<i16> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args([
            "-map", "0:a", "-f", "s16le", "-ac", "1", "-ar", "48000", "-",
        ])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success());
    out.stdout
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Amplitude of the `hz` component in `samples` (Goertzel).
fn tone(samples: &[i16], hz: f64) -> f64 {
    let n = samples.len() as f64;
    let w = 2.0 * std::f64::consts::PI * hz / 48_000.0;
    let (mut s1, mut s2) = (0.0, 0.0);
    for x in samples {
        let s = *x as f64 + 2.0 * w.cos() * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
    2.0 * power.sqrt() / n
}

fn window(samples: &[i16], from_s: f64, to_s: f64) -> &[i16] {
    let a = ((from_s * 48_000.0) as usize).min(samples.len());
    let b = ((to_s * 48_000.0) as usize).min(samples.len());
    &samples[a..b]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voices_and_the_speakers_video_in_one_file() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let vp8 = Arc::new(vp8_test_frames(4).unwrap());
    let a = join(&server, "ann", 1, 440.0, &vp8).await;
    let b = join(&server, "ben", 2, 660.0, &vp8).await;
    until(
        "media between the first two",
        Duration::from_secs(20),
        || {
            a.received(&b.participant_id, Kind::Video).packets.len() > 30
                && b.received(&a.participant_id, Kind::Audio).packets.len() > 30
        },
    )
    .await;

    let store_dir = tmp("store");
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(store_dir.clone()));
    let room = server.sfu().room("recorded").unwrap();
    let settings = Settings {
        segment: Duration::from_secs(5),
        spool: tmp("spool"),
        ..Default::default()
    };
    let started = Instant::now();
    let rec = confer_recorder::start(room, "Tones".into(), store.clone(), settings);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let c = join(&server, "cy", 3, 880.0, &vp8).await;
    let c_joined = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let manifest = rec.stop().await.unwrap();
    let wall = started.elapsed().as_secs_f64();

    let file = store_dir.join(store::key("recorded", &manifest.id, store::MEDIA));
    let (streams, duration) = probe(&file);
    assert_eq!(streams, ["video:vp8", "audio:opus"]);
    assert!(
        (duration - wall).abs() < 0.5,
        "duration {duration:.2} s, recorded for {wall:.2} s"
    );
    assert!((manifest.duration_ms as f64 / 1000.0 - duration).abs() < 0.5);
    assert_eq!(manifest.size, std::fs::metadata(&file).unwrap().len());
    assert_eq!(manifest.participants.len(), 3);
    decodes_cleanly(&file);

    // Ann and Ben throughout; Cy from when Cy joined.
    let audio = pcm(&file);
    let before = window(&audio, 1.0, c_joined - 1.0);
    let after = window(&audio, c_joined + 2.0, wall - 1.0);
    for (hz, expect_before) in [(440.0, true), (660.0, true), (880.0, false)] {
        let (x, y) = (tone(before, hz), tone(after, hz));
        assert!(
            y > 1000.0,
            "{hz} Hz missing after {c_joined:.1} s: amplitude {y:.0}"
        );
        if expect_before {
            assert!(x > 1000.0, "{hz} Hz missing before: amplitude {x:.0}");
        } else {
            assert!(
                x < 300.0,
                "{hz} Hz heard before its speaker joined: amplitude {x:.0}"
            );
        }
    }
    drop(c);
}

/// The width and height of every video frame in `file`.
fn frame_sizes(file: &Path) -> Vec<String> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v", "-show_entries"])
        .args(["frame=width,height", "-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A client that sends only H.264 (some Safari and hardware-encoder
/// set-ups) is seen in the recording: WebM holds no H.264, so its video is
/// made VP8 while it is on screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h264_only_publisher_is_seen_in_the_recording() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let h264 = Arc::new(h264_test_frames(2).unwrap());
    let token = server.token("ann", "recorded");
    let a = Client::join_real(&server, "ann", &token, 1, RealMedia::h264(440.0, h264))
        .await
        .unwrap();
    let b = Client::join(&server, "ben", "recorded", 2, false)
        .await
        .unwrap();
    until("Ben gets Ann's H.264", Duration::from_secs(20), || {
        b.received(&a.participant_id, Kind::Video).packets.len() > 30
    })
    .await;

    let store_dir = tmp("store");
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(store_dir.clone()));
    let settings = Settings {
        segment: Duration::from_secs(3),
        spool: tmp("spool"),
        ..Default::default()
    };
    let room = server.sfu().room("recorded").unwrap();
    let rec = confer_recorder::start(room, "H.264".into(), store.clone(), settings);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let manifest = rec.stop().await.unwrap();

    let file = store_dir.join(store::key("recorded", &manifest.id, store::MEDIA));
    let (streams, duration) = probe(&file);
    assert_eq!(streams, ["video:vp8", "audio:opus"]);
    decodes_cleanly(&file);
    // Ann's 320×240 picture, not the 640×360 placeholder, nearly throughout
    // (across segments, so keyframes were made at each boundary).
    let sizes = frame_sizes(&file);
    let ann = sizes.iter().filter(|s| *s == "320,240").count();
    assert!(
        ann as f64 >= (duration - 1.5) * 25.0,
        "{ann} frames of Ann's video in {duration:.1} s: {:?}",
        &sizes[..sizes.len().min(10)]
    );
    assert!(tone(&pcm(&file), 440.0) > 1000.0, "Ann not heard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_that_dies_leaves_a_playable_file_after_recovery() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let (_ann, _ben) = ann_and_ben_talking(&server).await;

    let store_dir = tmp("store");
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(store_dir.clone()));
    let spool = tmp("spool");
    let settings = Settings {
        segment: Duration::from_secs(3),
        spool: spool.clone(),
        ..Default::default()
    };
    let room = server.sfu().room("recorded").unwrap();
    let rec = confer_recorder::start(room, "Crash".into(), store.clone(), settings);
    tokio::time::sleep(Duration::from_millis(7500)).await;
    // Dies without a word: no trailer, no manifest, no upload.
    rec.abort();
    server.sfu().room("recorded").unwrap().stop_tap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.list(store::PREFIX).await.unwrap().is_empty());

    let recovered =
        confer_recorder::recover(&spool, store.as_ref(), chrono::Duration::days(30), false).await;
    assert_eq!(recovered.len(), 1);
    let file = store_dir.join(store::key("recorded", &recovered[0].id, store::MEDIA));
    let (streams, duration) = probe(&file);
    assert_eq!(streams, ["video:vp8", "audio:opus"]);
    // Two completed 3 s segments at least.
    assert!(duration >= 6.0, "only {duration:.2} s recovered");
    decodes_cleanly(&file);
    assert!(tone(window(&pcm(&file), 1.0, 5.0), 660.0) > 1000.0);
}

/// Times (s) in `samples` where a `hz` beep starts: 10 ms windows whose
/// amplitude at `hz` rises above half of the beep's.
fn beep_onsets(samples: &[i16], hz: f64) -> Vec<f64> {
    let win = 480;
    let mut onsets = Vec::new();
    let mut on = false;
    for (i, w) in samples.chunks(win).enumerate() {
        let loud = tone(w, hz) > 2000.0;
        if loud && !on {
            onsets.push(i as f64 * win as f64 / 48_000.0);
        }
        on = loud;
    }
    onsets
}

/// Times (s) of frames where the picture turns white. (ffmpeg rather than
/// ffprobe: the filter graph must follow the resolution changes.)
fn flash_onsets(file: &Path) -> Vec<f64> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args([
            "-an",
            "-vf",
            "scale=32:24,signalstats,metadata=print:key=lavfi.signalstats.YAVG:file=-",
        ])
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut onsets = Vec::new();
    let (mut on, mut t) = (false, 0.0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(pt) = line.split("pts_time:").nth(1) {
            t = pt.trim().parse().unwrap_or(t);
        } else if let Some(y) = line.strip_prefix("lavfi.signalstats.YAVG=") {
            let white = y.trim().parse::<f64>().unwrap_or(0.0) > 128.0;
            if white && !on {
                onsets.push(t);
            }
            on = white;
        }
    }
    onsets
}

/// A participant sends a beep and a white flash together every 2 s; in the
/// recording each beep starts within 80 ms of its flash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_and_video_stay_in_sync() {
    check_sync(false).await;
}

/// The recorder process gets the SFU's sender reports, not the
/// publisher's: lips must still be in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_and_video_stay_in_sync_through_a_recorder_process() {
    check_sync(true).await;
}

async fn check_sync(through_recorder_process: bool) {
    init_logging();
    let store_dir = tmp("store");
    let (server, recorder) = match through_recorder_process {
        true => {
            let (s, r) = server_with_recorder(&store_dir).await;
            (s, Some(r))
        }
        false => (TestServer::start().await.unwrap(), None),
    };
    let flashes = Arc::new(confer_tests::vp8_flash_frames(4).unwrap());
    let media = RealMedia::beeps(1000.0, flashes);
    let a = Client::join_real(&server, "ann", &server.token("ann", "sync"), 1, media)
        .await
        .unwrap();
    // Ben only listens: with video of his own, the recording might show his.
    let b = Client::join(&server, "ben", "sync", 2, false)
        .await
        .unwrap();
    until("media", Duration::from_secs(20), || {
        b.received(&a.participant_id, Kind::Video).packets.len() > 30
    })
    .await;
    let id = if through_recorder_process {
        let recordings = &server.state.recordings;
        let id = recordings.start("sync", "Sync", "user-ann").unwrap();
        tokio::time::sleep(Duration::from_secs(12)).await;
        recordings.stop("sync", "stopped by a moderator").unwrap();
        until("the recording available", Duration::from_secs(30), || {
            b.saw(|e| e["type"] == "recording" && e["state"] == "available")
        })
        .await;
        id
    } else {
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(store_dir.clone()));
        let settings = Settings {
            spool: tmp("spool"),
            ..Default::default()
        };
        let rec = confer_recorder::start(
            server.sfu().room("sync").unwrap(),
            "Sync".into(),
            store,
            settings,
        );
        tokio::time::sleep(Duration::from_secs(12)).await;
        rec.stop().await.unwrap().id
    };
    let file = store_dir.join(store::key("sync", &id, store::MEDIA));
    if let Some(r) = recorder {
        r.abort();
    }

    let beeps = beep_onsets(&pcm(&file), 1000.0);
    let flashes = flash_onsets(&file);
    assert!(
        beeps.len() >= 4 && flashes.len() >= 4,
        "beeps {beeps:?}, flashes {flashes:?}"
    );
    let mut offsets = Vec::new();
    for f in &flashes {
        if let Some(b) = beeps
            .iter()
            .min_by(|x, y| (*x - f).abs().total_cmp(&(*y - f).abs()))
        {
            offsets.push(b - f);
        }
    }
    println!("A/V offsets (audio − video), s: {offsets:?}");
    for o in &offsets {
        assert!(
            o.abs() <= 0.08,
            "audio {:.0} ms off its video; all: {offsets:?}",
            o * 1000.0
        );
    }
}

/// The spool is bounded: with it full, a recording in progress stops (and
/// is kept), the room is told why, and a new one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_stops_the_recording_and_keeps_what_it_holds() {
    init_logging();
    let spool = tmp("bounded-spool");
    let store_dir = tmp("bounded-store");
    let server = TestServer::start_with(|c| {
        c.recording.spool_max_mb = 1;
        c.recording.segment_seconds = 2;
        c.recording.spool_dir = Some(spool.clone());
        c.recording.local_dir = Some(store_dir.clone());
    })
    .await
    .unwrap();
    let (a, b) = ann_and_ben_talking(&server).await;

    // Recordings waiting for an unreachable store have filled the spool.
    std::fs::create_dir_all(&spool).unwrap();
    let backlog = spool.join("backlog");
    std::fs::write(&backlog, vec![0u8; 1_500_000]).unwrap();
    let refused = server
        .state
        .recordings
        .start("recorded", "Full", "user-ann");
    let err = refused.expect_err("a recording started on a full spool");
    assert!(err.to_string().contains("spool is full"), "{err}");

    std::fs::remove_file(&backlog).unwrap();
    let id = server
        .state
        .recordings
        .start("recorded", "Bounded", "user-ann")
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(a.saw(|e| e["type"] == "recording" && e["state"] == "started"));
    std::fs::write(&backlog, vec![0u8; 1_500_000]).unwrap();
    until(
        "the room told the recording stopped",
        Duration::from_secs(10),
        || {
            a.saw(|e| {
                e["type"] == "recording"
                    && e["state"] == "stopped"
                    && e["recording_id"] == id.as_str()
                    && e["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("spool is full"))
            })
        },
    )
    .await;
    assert!(!server.state.recordings.is_recording("recorded"));
    until("the recording available", Duration::from_secs(30), || {
        b.saw(|e| e["type"] == "recording" && e["state"] == "available")
    })
    .await;
    let file = store_dir.join(store::key("recorded", &id, store::MEDIA));
    let (streams, duration) = probe(&file);
    assert_eq!(streams, ["video:vp8", "audio:opus"]);
    assert!(duration >= 4.0, "only {duration:.2} s kept");
    decodes_cleanly(&file);
}

/// A server shutting down (SIGTERM) stores the recording in progress before
/// it exits, and says so to the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_stores_the_recording_in_progress() {
    init_logging();
    let server = TestServer::start().await.unwrap();
    let (a, b) = ann_and_ben_talking(&server).await;
    let recordings = &server.state.recordings;
    let id = recordings
        .start("recorded", "Until shutdown", &a.participant_id)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;

    assert_eq!(
        recordings.finish_all("the server is shutting down").await,
        1
    );
    let list = recordings.list("recorded").await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].id, id);
    assert!(list[0].duration_ms >= 3500, "{:?}", list[0]);
    until("the room told", Duration::from_secs(5), || {
        b.saw(|e| e["type"] == "recording" && e["state"] == "available")
    })
    .await;
    assert!(b.saw(|e| e["state"] == "stopped" && e["reason"] == "the server is shutting down"));
    assert!(!recordings.is_recording("recorded"));
}

/// Signaling that leaves recording to recorder processes, which store into
/// the directory it lists from.
fn remote_recording(c: &mut confer_signaling::Config, store_dir: &Path) {
    c.recording.recorders = confer_signaling::config::RecorderMode::Remote;
    c.recording.recorder_secret = Some(RECORDER_SECRET.into());
    c.recording.local_dir = Some(store_dir.to_owned());
    c.recording.segment_seconds = 5;
    c.auth.admin_secret = Some(ADMIN_SECRET.into());
}

const ADMIN_SECRET: &str = "an admin secret, 32 characters..";

async fn recorder_connected(server: &TestServer) {
    let remote = server.state.recordings.remote.clone().unwrap();
    until("the recorder connected", Duration::from_secs(10), || {
        remote.count() == 1
    })
    .await;
}

/// A recorder in this test process, connected.
async fn start_recorder(server: &TestServer, store_dir: &Path) -> tokio::task::JoinHandle<()> {
    let (run, stop) = recorder_worker(server, store_dir, &tmp("recorder-spool"), 5);
    let recorder = tokio::spawn(async move {
        run.await;
        drop(stop);
    });
    recorder_connected(server).await;
    recorder
}

/// Recording `id` of room `recorded`, once `told` has heard it is available.
async fn stored(
    told: &Client,
    recordings: &confer_signaling::recordings::Recordings,
    id: &str,
    within: Duration,
) -> confer_recorder::Manifest {
    until(&format!("recording {id} available"), within, || {
        told.saw(|e| {
            e["type"] == "recording" && e["state"] == "available" && e["recording_id"] == id
        })
    })
    .await;
    let list = recordings.list("recorded").await.unwrap();
    list.into_iter().find(|m| m.id == id).expect("listed")
}

/// Ann and Ben talking in a room of a server with remote recorders.
async fn remote_meeting(store_dir: &Path) -> (TestServer, Client, Client) {
    let server = TestServer::start_with(|c| remote_recording(c, store_dir))
        .await
        .unwrap();
    let (a, b) = ann_and_ben_talking(&server).await;
    (server, a, b)
}

async fn server_with_recorder(store_dir: &Path) -> (TestServer, tokio::task::JoinHandle<()>) {
    let server = TestServer::start_with(|c| remote_recording(c, store_dir))
        .await
        .unwrap();
    let recorder = start_recorder(&server, store_dir).await;
    (server, recorder)
}

/// `recording.recorders = "remote"`: a recorder process (here in the test
/// process, but connected as any other: the recorder WebSocket, then the
/// room over signaling and WebRTC) records, hidden from the participants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_process_records_as_a_hidden_participant() {
    use confer_signaling::recordings::RecordingError;
    init_logging();
    let store_dir = tmp("shared-store");
    let (server, a, b) = remote_meeting(&store_dir).await;
    let recordings = server.state.recordings.clone();
    let remote = recordings.remote.clone().unwrap();
    assert_eq!(
        recordings.start("recorded", "Remote", "user-ann"),
        Err(RecordingError::NoRecorder)
    );

    // A recorder with the wrong secret is turned away.
    let mut wrong = format!("ws://{}/api/recorders", server.addr)
        .into_client_request()
        .unwrap();
    wrong
        .headers_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    match tokio_tungstenite::connect_async(wrong).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("a wrong secret was not refused: {:?}", other.map(|_| ())),
    }

    let recorder = start_recorder(&server, &store_dir).await;
    assert_eq!(remote.count(), 1);
    let started = Instant::now();
    let id = recordings.start("recorded", "Remote", "user-ann").unwrap();
    // The admin API shows the recorder and what it holds, as documented.
    let admin: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/api/admin/recorders", server.addr))
        .bearer_auth(ADMIN_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&confer_signaling::doc_examples::marked(
        "http-api.md",
        "admin-recorders",
    ))
    .unwrap();
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&admin), keys(&doc));
    assert_eq!(keys(&admin["recorders"][0]), keys(&doc["recorders"][0]));
    assert_eq!(admin["mode"], "remote");
    assert_eq!(admin["recorders"][0]["recordings"], serde_json::json!([id]));
    until("the recorder in the room", Duration::from_secs(10), || {
        server
            .sfu()
            .room("recorded")
            .is_some_and(|r| r.summary().participants.len() == 3)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    recordings
        .stop("recorded", "stopped by a moderator")
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    until("the recording available", Duration::from_secs(30), || {
        b.saw(|e| e["type"] == "recording" && e["state"] == "available")
    })
    .await;

    // Hidden: nobody was told of it, and the room counts two.
    for c in [&a, &b] {
        assert!(
            !c.saw(|e| e["type"] == "participant_joined" && e["participant"]["role"] == "recorder")
        );
    }
    assert_eq!(
        server.sfu().room("recorded").unwrap().participant_count(),
        2
    );
    let list = recordings.list("recorded").await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].id, id);
    let file = store_dir.join(store::key("recorded", &id, store::MEDIA));
    let (streams, duration) = probe(&file);
    assert_eq!(streams, ["video:vp8", "audio:opus"]);
    // The recorder joins first: up to a second or so is not recorded.
    assert!(
        duration > wall - 2.0 && duration < wall + 0.5,
        "duration {duration:.2} s, recording asked for {wall:.2} s"
    );
    decodes_cleanly(&file);
    let audio = pcm(&file);
    let middle = window(&audio, 1.0, duration - 1.0);
    for hz in [440.0, 660.0] {
        let amplitude = tone(middle, hz);
        assert!(
            amplitude > 1000.0,
            "{hz} Hz missing: amplitude {amplitude:.0}"
        );
    }
    // It leaves the room once done.
    until("the recorder gone", Duration::from_secs(10), || {
        server
            .sfu()
            .room("recorded")
            .is_some_and(|r| r.summary().participants.len() == 2)
    })
    .await;
    recorder.abort();
}

/// A recorder process dies mid-recording: the room is told the recording
/// stopped; restarted, the recorder stores what its spool holds, and the
/// room is told it is available. Then a recorder that is shut down (SIGTERM)
/// stores the recording in progress before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_process_that_dies_or_stops_loses_nothing_it_wrote() {
    init_logging();
    let store_dir = tmp("shared-store");
    let (server, _a, b) = remote_meeting(&store_dir).await;
    let recordings = server.state.recordings.clone();
    let spool = tmp("recorder-spool");

    // The first recorder runs on a runtime of its own, so that it can die
    // as a process does: every task and socket gone at once, files left.
    let process = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (run, _stop) = recorder_worker(&server, &store_dir, &spool, 2);
    process.spawn(run);
    recorder_connected(&server).await;
    let first = recordings.start("recorded", "Dies", "user-ann").unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    process.shutdown_background();
    until("the room told it stopped", Duration::from_secs(10), || {
        b.saw(|e| e["type"] == "recording" && e["state"] == "stopped" && e["recording_id"] == first)
    })
    .await;
    assert!(!recordings.is_recording("recorded"));

    // Restarted on the same spool: it stores the file and says so.
    let (run, stop) = recorder_worker(&server, &store_dir, &spool, 2);
    let restarted = tokio::spawn(run);
    let m = stored(&b, &recordings, &first, Duration::from_secs(20)).await;
    // At least everything up to the last completed 2 s segment.
    assert!(m.duration_ms >= 4000, "{m:?}");
    let file = store_dir.join(store::key("recorded", &first, store::MEDIA));
    decodes_cleanly(&file);

    // Shut down while recording: stored and announced before it exits.
    recorder_connected(&server).await;
    let second = recordings.start("recorded", "Stops", "user-ann").unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), restarted)
        .await
        .expect("the recorder exits once it has stored")
        .unwrap();
    let m = stored(&b, &recordings, &second, Duration::from_secs(10)).await;
    assert!(m.duration_ms >= 3000, "{m:?}");
}
