//! Recordings in a real S3 server (Garage): the lifecycle rule installed at
//! start-up, upload, listing and download through a pre-signed URL, the
//! expiry sweep with the clock moved on, an outage of the S3 server
//! while a recording is being stored, and the recorder's machine lost
//! mid-recording.

use confer_recorder::recording::Settings;
use confer_recorder::s3::{S3Settings, S3Store};
use confer_recorder::store::{self, Store};
use confer_signaling::config::StoreKind;
use confer_tests::garage::{self, Garage};
use confer_tests::{Client, Kind, RealMedia, TestServer, init_logging, vp8_test_frames};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn settings(g: &Garage) -> S3Settings {
    S3Settings {
        endpoint: Some(g.endpoint.clone()),
        region: garage::REGION.into(),
        bucket: garage::BUCKET.into(),
        access_key_id: g.key_id.clone(),
        secret_access_key: g.secret.clone(),
        path_style: true,
    }
}

async fn until(what: &str, within: Duration, ok: impl AsyncFnMut() -> bool) {
    let mut ok = ok;
    let deadline = Instant::now() + within;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn probe_duration(bytes: &[u8]) -> f64 {
    ffprobe(bytes, "format=duration").trim().parse().unwrap()
}

/// Where the media in `bytes` ends on the recording's timeline (a segment
/// keeps its timestamps from the start of the recording).
fn probe_end(bytes: &[u8]) -> f64 {
    ffprobe(bytes, "packet=pts_time,duration_time")
        .lines()
        .filter_map(|l| {
            let (pts, dur) = l.split_once(',')?;
            Some(pts.parse::<f64>().ok()? + dur.parse::<f64>().unwrap_or(0.0))
        })
        .fold(0.0, f64::max)
}

fn ffprobe(bytes: &[u8], entries: &str) -> String {
    let path = std::env::temp_dir().join(format!("confer-dl-{:016x}.webm", rand::random::<u64>()));
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", entries, "-of", "csv=p=0"])
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spool_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("confer-spool-{:016x}", rand::random::<u64>()))
}

/// Records `room` straight through the recorder (3 s segments, uploaded as
/// they complete), as a node would.
fn record(
    server: &TestServer,
    room: &str,
    s3: Arc<dyn Store>,
    spool: &std::path::Path,
) -> confer_recorder::Running {
    let settings = Settings {
        segment: Duration::from_secs(3),
        spool: spool.to_owned(),
        upload_segments: true,
        ..Default::default()
    };
    let room = server.sfu().room(room).unwrap();
    confer_recorder::start(room, "Recorded".into(), s3, settings)
}

async fn meeting(server: &TestServer, room: &str) -> (Client, Client) {
    let vp8 = Arc::new(vp8_test_frames(2).unwrap());
    let media = |hz| RealMedia::tone(hz, vp8.clone());
    let a = Client::join_real(server, "ann", &server.token("ann", room), 1, media(440.0))
        .await
        .unwrap();
    let b = Client::join_real(server, "ben", &server.token("ben", room), 2, media(660.0))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.received(&a.participant_id, Kind::Audio).packets.len() < 30 {
        assert!(Instant::now() < deadline, "no media");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recordings_live_in_s3_with_a_lifecycle_rule_and_presigned_downloads() {
    init_logging();
    let g = Garage::start().await.unwrap();
    let server = TestServer::start_with(|c| {
        c.recording.store = StoreKind::S3;
        c.recording.segment_seconds = 3;
        c.recording.s3.endpoint = Some(g.endpoint.clone());
        c.recording.s3.region = garage::REGION.into();
        c.recording.s3.bucket = Some(garage::BUCKET.into());
        c.recording.s3.access_key_id = Some(g.key_id.clone());
        c.recording.s3.secret_access_key = Some(g.secret.clone());
        c.recording.s3.path_style = true;
    })
    .await
    .unwrap();
    let s3 = S3Store::new(&settings(&g));

    // The lifecycle rule is installed at start-up.
    until("the lifecycle rule", Duration::from_secs(10), async || {
        s3.lifecycle().await.ok().flatten() == Some(30)
    })
    .await;

    let (_a, _b) = meeting(&server, "s3-room").await;
    server
        .state
        .recordings
        .start("s3-room", "In S3", "user-ann")
        .unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    server.state.recordings.stop("s3-room", "test").unwrap();
    let recorded = started.elapsed().as_secs_f64();

    // Listed through the HTTP API with a join token, downloaded through the
    // pre-signed URL Confer redirects to.
    let http = reqwest::Client::new();
    let token = server.token("ann", "s3-room");
    let list_url = format!("http://{}/api/rooms/s3-room/recordings", server.addr);
    let mut list = serde_json::Value::Null;
    until(
        "the recording listed",
        Duration::from_secs(30),
        async || {
            list = http
                .get(&list_url)
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            list["recordings"].as_array().is_some_and(|r| r.len() == 1)
        },
    )
    .await;
    let rec = &list["recordings"][0];
    let link = format!(
        "http://{}{}",
        server.addr,
        rec["download_url"].as_str().unwrap()
    );
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let redirect = no_redirects.get(&link).send().await.unwrap();
    assert_eq!(redirect.status(), 302);
    let presigned = redirect.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        presigned.starts_with(&g.endpoint) && presigned.contains("X-Amz-Signature"),
        "{presigned}"
    );
    let body = http.get(&presigned).send().await.unwrap();
    assert_eq!(body.status(), 200);
    let bytes = body.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, rec["size"].as_u64().unwrap());
    let duration = probe_duration(&bytes);
    assert!(
        (duration - recorded).abs() < 0.5,
        "{duration:.2} s of {recorded:.2} s"
    );
    // Without a token, or with a tampered link: refused.
    assert_eq!(http.get(&list_url).send().await.unwrap().status(), 401);
    let tampered = link.replace("sig=", "sig=00");
    assert_eq!(
        no_redirects.get(&tampered).send().await.unwrap().status(),
        403
    );

    // The sweep, with the clock 31 days on, deletes it from the bucket.
    let keys = s3.list(store::PREFIX).await.unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(store::sweep(&s3, chrono::Utc::now()).await.unwrap(), 0);
    let later = chrono::Utc::now() + chrono::Duration::days(31);
    assert_eq!(store::sweep(&s3, later).await.unwrap(), 1);
    assert!(s3.list(store::PREFIX).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_while_storing_ends_with_a_complete_file() {
    init_logging();
    let mut g = Garage::start().await.unwrap();
    let server = TestServer::start().await.unwrap();
    let (_a, _b) = meeting(&server, "outage").await;
    let s3: Arc<dyn Store> = Arc::new(S3Store::new(&settings(&g)));
    let spool = spool_dir();
    let rec = record(&server, "outage", s3.clone(), &spool);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    g.pause(); // the S3 server goes away mid-recording...
    tokio::time::sleep(Duration::from_secs(4)).await;
    let recorded = started.elapsed().as_secs_f64();
    // ...and is still away when the recording stops: storing fails after retries.
    assert!(rec.stop().await.is_err());
    g.resume().await.unwrap();
    // The periodic pass stores it once the server is back.
    let stored =
        confer_recorder::recover(&spool, s3.as_ref(), chrono::Duration::days(30), true).await;
    assert_eq!(stored.len(), 1);
    let bytes = s3
        .get_bytes(&store::key("outage", &stored[0].id, store::MEDIA))
        .await
        .unwrap()
        .expect("stored");
    let duration = probe_duration(&bytes);
    assert!(
        (duration - recorded).abs() < 0.6,
        "{duration:.2} s of {recorded:.2} s"
    );
    // The segments uploaded before the outage are gone with the rest.
    let keys = s3.list(store::PREFIX).await.unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_machine_loses_at_most_the_segment_in_progress() {
    init_logging();
    let g = Garage::start().await.unwrap();
    let server = TestServer::start().await.unwrap();
    let (_a, _b) = meeting(&server, "lost").await;
    let s3: Arc<dyn Store> = Arc::new(S3Store::new(&settings(&g)));
    let spool = spool_dir();
    let rec = record(&server, "lost", s3.clone(), &spool);
    let parts = async || {
        let keys = s3.list(store::PREFIX).await.unwrap();
        keys.into_iter()
            .filter(|k| k.contains("/parts/"))
            .collect::<Vec<_>>()
    };
    until(
        "two segments uploaded",
        Duration::from_secs(30),
        async || parts().await.len() >= 2,
    )
    .await;
    // A third segment is under way when the machine goes: process, spool
    // and all.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut kept: f64 = 0.0;
    let uploaded = parts().await;
    for k in &uploaded {
        kept = kept.max(probe_end(&s3.get_bytes(k).await.unwrap().unwrap()));
    }

    // Another node looks while the recorder still lives: its heartbeat is
    // fresh, so the recording is left alone.
    let keep = chrono::Duration::days(30);
    let elsewhere = spool_dir();
    let now = chrono::Utc::now();
    let found = confer_recorder::recover_orphans(&elsewhere, s3.as_ref(), keep, now).await;
    assert!(found.unwrap().is_empty());

    rec.abort();
    server.sfu().room("lost").unwrap().stop_tap();
    std::fs::remove_dir_all(&spool).unwrap();

    // Minutes later the heartbeat is stale: the other node finishes it.
    let later = chrono::Utc::now() + chrono::Duration::minutes(5);
    let found = confer_recorder::recover_orphans(&elsewhere, s3.as_ref(), keep, later)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    let m = &found[0];
    assert_eq!(m.title, "Recorded");
    let mut names: Vec<_> = m.participants.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["ann", "ben"]);
    let bytes = s3
        .get_bytes(&store::key("lost", &m.id, store::MEDIA))
        .await
        .unwrap()
        .expect("stored");
    let duration = probe_duration(&bytes);
    assert!(
        duration >= kept - 0.1 && duration >= 5.0,
        "{duration:.2} s stored; the {} uploaded segments end at {kept:.2} s",
        uploaded.len()
    );
    // Only the file and its manifest remain; the other node's spool is clear.
    let keys = s3.list(store::PREFIX).await.unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(confer_recorder::spool_bytes(&elsewhere), 0);
}
