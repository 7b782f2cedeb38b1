//! One recording of one room, from the SFU's tap to a finished file in the
//! store.
//!
//! Every 20 ms the pipeline releases what the jitter buffers hold: audio is
//! decoded and mixed, and the mix up to `playout_delay` ago is encoded and
//! written; the shown video (the active speaker's, switched at their next
//! keyframe) is written as it completes. Segments of `segment` length go to
//! the spool directory, each one a playable WebM; at the end they are
//! joined, uploaded with a manifest, and the spool is cleared. A recorder
//! that dies leaves its segments and `state.json`; [`recover`] finishes
//! them on the next start. With `upload_segments`, each completed segment
//! is also uploaded as it goes ([`crate::upload`]), for when the machine
//! itself is lost.

use crate::audio::{self, Decoder, Encoder, Mixer};
use crate::h264;
use crate::jitter::{JitterBuffer, Out};
use crate::mux::{self, SegmentWriter};
use crate::store::{self, Manifest, Person, Store};
use crate::timeline::{self, Clock, Report};
use crate::transcode::Transcoder;
use crate::upload::{self, Uploader};
use crate::vp8::{self, Depacketizer};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use confer_sfu::TrackKind;
use confer_sfu::room::Room;
use confer_sfu::tap::{TapTrack, Tapped};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

#[derive(Clone, Debug)]
pub struct Settings {
    /// Length of a segment: at most this much is lost if the recorder dies.
    pub segment: Duration,
    /// How long audio waits for late and retransmitted packets.
    pub playout_delay: Duration,
    /// How long a recording is kept.
    pub keep: chrono::Duration,
    /// Local directory for segments in progress.
    pub spool: PathBuf,
    pub audio_bitrate: i32,
    /// Upload each segment once complete, so that losing this machine
    /// loses at most the segment in progress. Worth it when the store is
    /// elsewhere (S3), not for a local directory on the same disk.
    pub upload_segments: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            segment: Duration::from_secs(10),
            playout_delay: Duration::from_millis(500),
            keep: chrono::Duration::days(30),
            spool: std::env::temp_dir().join("confer-spool"),
            audio_bitrate: 48_000,
            upload_segments: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording files: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Mux(#[from] mux::MuxError),
    #[error(transparent)]
    Audio(#[from] audio::AudioError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("nothing was recorded")]
    Empty,
    /// A recorder process elsewhere could not record or store it.
    #[error("recorder: {0}")]
    Remote(String),
}

/// What survives a crash, next to the segments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub id: String,
    pub room: String,
    pub title: String,
    pub started_at: DateTime<Utc>,
    pub participants: Vec<Person>,
}

/// A recording in progress.
pub struct Running {
    pub id: String,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<Manifest, RecordError>>,
}

impl Running {
    /// A recording that another task carries out (a recorder process
    /// elsewhere): `stop` is signalled, then `done` is awaited.
    pub fn elsewhere(
        id: String,
        stop: oneshot::Sender<()>,
        done: tokio::task::JoinHandle<Result<Manifest, RecordError>>,
    ) -> Running {
        Running {
            id,
            stop: Some(stop),
            done,
        }
    }

    /// It ended without being stopped: its room closed, or it failed.
    pub fn is_finished(&self) -> bool {
        self.done.is_finished()
    }

    /// Ends the recording task where it stands, as if the process died:
    /// no trailer, no upload. [`recover`] finishes what it left.
    pub fn abort(self) {
        self.done.abort();
    }

    /// Stops recording and waits until the file is stored.
    pub async fn stop(mut self) -> Result<Manifest, RecordError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.done.await {
            Ok(r) => r,
            Err(e) => Err(RecordError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Asks the publisher of a track for a keyframe.
pub type Keyframes = dyn Fn(&str) + Send + Sync;

/// Where a recording's media comes from: the room in this process
/// ([`Feed::tap`]), or a recorder's own WebRTC connection to it
/// ([`crate::participant`]).
pub struct Feed {
    pub room: String,
    pub events: mpsc::Receiver<Tapped>,
    pub keyframe: Box<Keyframes>,
    /// Called once the recording stops taking media.
    pub end: Box<dyn FnOnce() + Send>,
}

impl Feed {
    /// The tap of a room in this process.
    pub fn tap(room: Arc<Room>) -> Feed {
        let events = room.start_tap();
        let (r1, r2) = (room.clone(), room.clone());
        Feed {
            room: room.id.clone(),
            events,
            keyframe: Box::new(move |id| r1.request_keyframe(id)),
            end: Box::new(move || r2.stop_tap()),
        }
    }
}

/// A new recording id: 128 random bits, so that keys are not guessable.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Starts recording `room` in this process.
pub fn start(room: Arc<Room>, title: String, store: Arc<dyn Store>, settings: Settings) -> Running {
    start_feed(Feed::tap(room), new_id(), title, store, settings)
}

/// Starts recording what `feed` brings, as recording `id`.
pub fn start_feed(
    feed: Feed,
    id: String,
    title: String,
    store: Arc<dyn Store>,
    settings: Settings,
) -> Running {
    let state = State {
        id: id.clone(),
        room: feed.room.clone(),
        title,
        started_at: Utc::now(),
        participants: Vec::new(),
    };
    let (stop, stop_rx) = oneshot::channel();
    let done = tokio::spawn(run(feed, state, store, settings, stop_rx));
    Running {
        id,
        stop: Some(stop),
        done,
    }
}

async fn run(
    feed: Feed,
    state: State,
    store: Arc<dyn Store>,
    settings: Settings,
    mut stop: oneshot::Receiver<()>,
) -> Result<Manifest, RecordError> {
    let dir = settings.spool.join(&state.room).join(&state.id);
    tokio::fs::create_dir_all(&dir).await?;
    let uploader = settings
        .upload_segments
        .then(|| Uploader::start(store.clone(), state.clone(), settings.segment));
    let mut p = Pipeline::new(state, dir.clone(), &settings, uploader)?;
    p.save_state()?;
    info!(room = %feed.room, recording = %p.state.id, "recording started");
    let Feed {
        events: mut tap,
        keyframe,
        end,
        ..
    } = feed;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = tap.recv() => match event {
                Some(e) => p.event(e, &keyframe),
                None => break,
            },
            _ = tick.tick() => p.tick(Instant::now(), &keyframe)?,
        }
    }
    end();
    while let Ok(e) = tap.try_recv() {
        p.event(e, &keyframe);
    }
    let state = p.finish()?;
    // From here the spool holds a finished recording: if storing fails, a
    // later `recover` pass stores it.
    mark_stopped(&dir)?;
    info!(room = %state.room, recording = %state.id, "recording stopped; storing");
    let ended_at = Utc::now();
    let mut delay = Duration::from_secs(1);
    loop {
        match finalize(&dir, state.clone(), store.as_ref(), settings.keep, ended_at).await {
            Err(RecordError::Store(e)) if delay <= Duration::from_secs(4) => {
                warn!(recording = %state.id, error = %e, "storage unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
}

/// Marks a spooled recording as finished (no process is writing it).
const STOPPED: &str = "stopped";

pub(crate) fn mark_stopped(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join(STOPPED), b"")
}

pub(crate) fn write_state(dir: &Path, state: &State) -> std::io::Result<()> {
    let tmp = dir.join("state.json.part");
    std::fs::write(&tmp, serde_json::to_vec(state).expect("state serialises"))?;
    std::fs::rename(tmp, dir.join("state.json"))
}

fn segment_name(no: u32) -> String {
    format!("seg-{no:05}.webm")
}

pub(crate) fn is_segment_name(name: &str) -> bool {
    name.len() == segment_name(0).len()
        && name.starts_with("seg-")
        && name.ends_with(".webm")
        && name[4..9].bytes().all(|b| b.is_ascii_digit())
}

/// Joins the segments in `dir`, stores the file and its manifest, and
/// clears `dir` and the parts uploaded as it went.
pub(crate) async fn finalize(
    dir: &Path,
    state: State,
    store: &dyn Store,
    keep: chrono::Duration,
    ended_at: DateTime<Utc>,
) -> Result<Manifest, RecordError> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_segment_name)
        })
        .collect();
    segments.sort();
    if segments.is_empty() {
        std::fs::remove_dir_all(dir)?;
        return Err(RecordError::Empty);
    }
    let out = dir.join(store::MEDIA);
    let duration_ms = {
        let (segments, out) = (segments.clone(), out.clone());
        tokio::task::spawn_blocking(move || mux::concat(&segments, &out))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??
    };
    let size = store
        .put_file(&store::key(&state.room, &state.id, store::MEDIA), &out)
        .await?;
    let manifest = Manifest {
        id: state.id.clone(),
        room: state.room.clone(),
        title: state.title,
        started_at: state.started_at,
        ended_at,
        duration_ms,
        participants: state.participants,
        size,
        expires_at: ended_at + keep,
        content_type: "video/webm".into(),
    };
    // The manifest last: a recording is listed only once its media is stored.
    store
        .put_bytes(
            &store::key(&state.room, &state.id, store::MANIFEST),
            serde_json::to_vec_pretty(&manifest).expect("manifest serialises"),
        )
        .await?;
    std::fs::remove_dir_all(dir)?;
    info!(room = %manifest.room, recording = %manifest.id, duration_ms, size, "recording stored");
    if let Err(e) = upload::clear(store, &manifest.room, &manifest.id).await {
        // The orphan pass deletes them later; the lifecycle rule at last.
        warn!(recording = %manifest.id, error = %e, "could not delete uploaded segments");
    }
    Ok(manifest)
}

/// Finishes recordings left in the spool: at start-up (`only_stopped`
/// false) everything there, which an earlier process was writing when it
/// died, so whatever segments it has become its file; later (`true`) the
/// recordings that stopped but could not be stored yet (storage was down).
pub async fn recover(
    spool: &Path,
    store: &dyn Store,
    keep: chrono::Duration,
    only_stopped: bool,
) -> Vec<Manifest> {
    let mut done = Vec::new();
    let Ok(rooms) = std::fs::read_dir(spool) else {
        return done;
    };
    for room in rooms.flatten() {
        let Ok(recordings) = std::fs::read_dir(room.path()) else {
            continue;
        };
        for rec in recordings.flatten() {
            let dir = rec.path();
            if only_stopped && !dir.join(STOPPED).exists() {
                continue;
            }
            let Ok(text) = std::fs::read(dir.join("state.json")) else {
                continue;
            };
            let Ok(state) = serde_json::from_slice::<State>(&text) else {
                warn!(dir = %dir.display(), "unreadable recording state; left alone");
                continue;
            };
            let ended_at = newest_mtime(&dir).unwrap_or_else(Utc::now);
            info!(room = %state.room, recording = %state.id, "finishing a recording left by an earlier process");
            match finalize(&dir, state, store, keep, ended_at).await {
                Ok(m) => done.push(m),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "could not finish a left-over recording")
                }
            }
        }
    }
    done
}

/// Bytes in the spool: recordings in progress and those waiting for storage.
pub fn spool_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => spool_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

fn newest_mtime(dir: &Path) -> Option<DateTime<Utc>> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.metadata().ok()?.modified().ok())
        .max()
        .map(DateTime::<Utc>::from)
}

struct Packet {
    timeline_us: i64,
    marker: bool,
    rtp_ts: u32,
    payload: Bytes,
}

enum Media {
    Audio {
        decoder: Decoder,
        next_sample: Option<u64>,
    },
    Video(Video),
}

/// A video track as it arrives: VP8 goes into the file as it is; H.264 is
/// decoded and encoded as VP8, only while it is on screen.
enum Video {
    Vp8(Depacketizer),
    H264 {
        depack: h264::Depacketizer,
        transcoder: Option<Transcoder>,
    },
}

impl Video {
    fn lost(&mut self) {
        match self {
            Video::Vp8(d) => d.lost(),
            Video::H264 { depack, .. } => depack.lost(),
        }
    }

    /// The next frame made here is a keyframe, without asking the
    /// publisher (H.264 only: VP8 frames are the publisher's own).
    fn request_keyframe(&mut self) {
        if let Video::H264 {
            transcoder: Some(t),
            ..
        } = self
        {
            t.request_keyframe();
        }
    }

    /// The VP8 frames `p` completes; `on_screen`: shown, or about to be.
    fn push(&mut self, p: &Packet, on_screen: bool) -> Result<Vec<vp8::Frame>, String> {
        match self {
            Video::Vp8(d) => Ok(d
                .push(&p.payload, p.rtp_ts, p.marker)
                .map_err(|e| e.to_string())?
                .into_iter()
                .collect()),
            Video::H264 { depack, transcoder } => {
                let frame = depack
                    .push(&p.payload, p.rtp_ts, p.marker)
                    .map_err(|e| e.to_string())?;
                let Some(frame) = frame else {
                    return Ok(Vec::new());
                };
                if !on_screen {
                    // Decoding costs CPU: only for the picture recorded.
                    *transcoder = None;
                    return Ok(Vec::new());
                }
                if transcoder.is_none() {
                    if !frame.keyframe {
                        return Ok(Vec::new());
                    }
                    *transcoder = Some(Transcoder::new().map_err(|e| e.to_string())?);
                }
                let t = transcoder.as_mut().expect("made above");
                t.push(&frame.data, p.timeline_us / 1000)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

struct Track {
    info: TapTrack,
    clock: Clock,
    jitter: JitterBuffer<Packet>,
    media: Media,
    report: Option<Report>,
    synced: bool,
}

/// Placeholder picture size, and how long without video before it shows.
const PLACEHOLDER: (u32, u32) = (640, 360);
const PLACEHOLDER_AFTER_MS: i64 = 1000;
/// Give up waiting for a keyframe to start a new segment after this long.
const ROLLOVER_PATIENCE_MS: i64 = 3000;

struct Pipeline {
    state: State,
    dir: PathBuf,
    segment_ms: i64,
    delay_us: i64,
    t0: Instant,
    tracks: HashMap<Arc<str>, Track>,
    speaker: Option<String>,
    shown: Option<Arc<str>>,
    pending: Option<Arc<str>>,
    mixer: Mixer,
    encoder: Encoder,
    writer: Option<SegmentWriter>,
    segment_no: u32,
    segment_started_ms: i64,
    rollover_since: Option<i64>,
    last_video_ms: i64,
    placeholder: Vec<u8>,
    pre_skip: u16,
    uploader: Option<Uploader>,
}

impl Pipeline {
    fn new(
        state: State,
        dir: PathBuf,
        settings: &Settings,
        uploader: Option<Uploader>,
    ) -> Result<Pipeline, RecordError> {
        let mut encoder = Encoder::new(settings.audio_bitrate)?;
        let pre_skip = encoder.lookahead();
        let placeholder = mux::placeholder_keyframe(PLACEHOLDER.0, PLACEHOLDER.1)?;
        let mut p = Pipeline {
            state,
            dir,
            segment_ms: settings.segment.as_millis() as i64,
            delay_us: settings.playout_delay.as_micros() as i64,
            t0: Instant::now(),
            tracks: HashMap::new(),
            speaker: None,
            shown: None,
            pending: None,
            mixer: Mixer::default(),
            encoder,
            writer: None,
            segment_no: 0,
            segment_started_ms: 0,
            rollover_since: None,
            last_video_ms: 0,
            placeholder,
            pre_skip,
            uploader,
        };
        // The file starts with the placeholder until someone's video shows.
        let still = p.placeholder.clone();
        p.new_segment(0, PLACEHOLDER.0 as u16, PLACEHOLDER.1 as u16, &still)?;
        Ok(p)
    }

    fn now_us(&self, at: Instant) -> i64 {
        at.saturating_duration_since(self.t0).as_micros() as i64
    }

    fn save_state(&self) -> Result<(), RecordError> {
        Ok(write_state(&self.dir, &self.state)?)
    }

    fn event(&mut self, e: Tapped, keyframe: &Keyframes) {
        match e {
            Tapped::Track(info) => {
                let media = match info.kind {
                    TrackKind::Audio if info.codec == "audio/opus" => match Decoder::new() {
                        Ok(decoder) => Media::Audio {
                            decoder,
                            next_sample: None,
                        },
                        Err(e) => return warn!(error = %e, "no Opus decoder; track not recorded"),
                    },
                    TrackKind::Video if info.codec == "video/vp8" => {
                        Media::Video(Video::Vp8(Depacketizer::default()))
                    }
                    TrackKind::Video if info.codec == "video/h264" => Media::Video(Video::H264 {
                        depack: h264::Depacketizer::default(),
                        transcoder: None,
                    }),
                    _ => return debug!(codec = %info.codec, "codec not recorded"),
                };
                if !self
                    .state
                    .participants
                    .iter()
                    .any(|p| p.user_id == info.user_id)
                {
                    self.state.participants.push(Person {
                        user_id: info.user_id.clone(),
                        name: info.name.clone(),
                    });
                }
                let is_video = matches!(media, Media::Video(_));
                let id = info.track_id.clone();
                self.tracks.insert(
                    id.clone(),
                    Track {
                        clock: Clock::new(info.clock_rate),
                        jitter: JitterBuffer::new(Duration::from_millis(300)),
                        media,
                        report: None,
                        synced: false,
                        info,
                    },
                );
                if is_video && self.shown.is_none() && self.pending.is_none() {
                    self.pending = Some(id.clone());
                    keyframe(&id);
                }
            }
            Tapped::Rtp {
                track_id,
                at,
                packet,
            } => {
                let now_us = self.now_us(at);
                let Some(t) = self.tracks.get_mut(&track_id) else {
                    return;
                };
                let timeline_us = t.clock.at(packet.header.timestamp, now_us);
                t.jitter.push(
                    packet.header.sequence_number,
                    at,
                    Packet {
                        timeline_us,
                        marker: packet.header.marker,
                        rtp_ts: packet.header.timestamp,
                        payload: packet.payload,
                    },
                );
            }
            Tapped::SenderReport { track_id, ntp, rtp } => {
                if let Some(t) = self.tracks.get_mut(&track_id) {
                    t.report = Some((timeline::ntp_seconds(ntp), rtp));
                }
                self.sync_lips(&track_id);
            }
            Tapped::TrackEnded { track_id } => {
                self.tracks.remove(&track_id);
                if self.shown.as_ref() == Some(&track_id) {
                    self.shown = None;
                }
                if self.pending.as_ref() == Some(&track_id) {
                    self.pending = None;
                }
                if self.shown.is_none() && self.pending.is_none() {
                    self.pick_video(keyframe);
                }
            }
            Tapped::Speaker { participant_id } => {
                self.speaker = participant_id;
                self.pick_video(keyframe);
            }
        }
    }

    /// Once a participant's audio and video both have a sender report,
    /// moves their video onto their audio's timeline.
    fn sync_lips(&mut self, track_id: &Arc<str>) {
        let Some(participant) = self
            .tracks
            .get(track_id)
            .map(|t| t.info.participant_id.clone())
        else {
            return;
        };
        let find = |kind: TrackKind| {
            self.tracks
                .iter()
                .find(|(_, t)| {
                    t.info.participant_id == participant
                        && t.info.kind == kind
                        && t.report.is_some()
                })
                .map(|(id, _)| id.clone())
        };
        let (Some(a), Some(v)) = (find(TrackKind::Audio), find(TrackKind::Video)) else {
            return;
        };
        if self.tracks[&v].synced || !self.tracks[&a].clock.is_anchored() {
            return;
        }
        let audio = self.tracks[&a].clock;
        let audio_sr = self.tracks[&a].report.expect("found with a report");
        let video = self.tracks.get_mut(&v).expect("found");
        let video_sr = video.report.expect("found with a report");
        if let Some(moved) =
            timeline::sync_video_to_audio(&audio, audio_sr, &mut video.clock, video_sr)
        {
            video.synced = true;
            debug!(participant, moved_us = moved, "video synchronised to audio");
        }
    }

    /// Chooses whose video to show: the active speaker's if they have
    /// video, else whoever is shown already, else anyone's.
    fn pick_video(&mut self, keyframe: &Keyframes) {
        let video_of = |p: &str| {
            self.tracks
                .iter()
                .find(|(_, t)| t.info.participant_id == p && t.info.kind == TrackKind::Video)
                .map(|(id, _)| id.clone())
        };
        let want = self
            .speaker
            .as_deref()
            .and_then(video_of)
            .or_else(|| self.shown.clone())
            .or_else(|| {
                self.tracks
                    .iter()
                    .filter(|(_, t)| t.info.kind == TrackKind::Video)
                    .map(|(id, _)| id.clone())
                    .min()
            });
        if let Some(id) = want
            && Some(&id) != self.shown.as_ref()
            && Some(&id) != self.pending.as_ref()
        {
            keyframe(&id);
            self.pending = Some(id);
        }
    }

    fn tick(&mut self, now: Instant, keyframe: &Keyframes) -> Result<(), RecordError> {
        self.drain_jitter(now, keyframe)?;
        let now_ms = self.now_us(now) / 1000;
        // Audio up to the playout delay ago.
        let until = ((self.now_us(now) - self.delay_us).max(0) as u64 * audio::RATE as u64
            / 1_000_000)
            / audio::FRAME as u64;
        self.write_audio(until)?;
        // Nobody's video for a while: the still picture, once a second.
        if now_ms - self.last_video_ms >= PLACEHOLDER_AFTER_MS {
            let still = self.placeholder.clone();
            if self.rollover_since.is_some() {
                self.rollover(now_ms, PLACEHOLDER.0 as u16, PLACEHOLDER.1 as u16, &still)?;
            } else if let Some(w) = self.writer.as_mut() {
                w.video(now_ms, true, &still)?;
            }
            self.last_video_ms = now_ms;
        }
        // Time for a new segment: wait for the shown video's next keyframe.
        if self.rollover_since.is_none() && now_ms - self.segment_started_ms >= self.segment_ms {
            self.rollover_since = Some(now_ms);
            if let Some(id) = &self.shown {
                keyframe(id);
                if let Some(Track {
                    media: Media::Video(v),
                    ..
                }) = self.tracks.get_mut(id)
                {
                    v.request_keyframe();
                }
            }
        }
        if let Some(since) = self.rollover_since
            && now_ms - since >= ROLLOVER_PATIENCE_MS
        {
            let still = self.placeholder.clone();
            self.rollover(now_ms, PLACEHOLDER.0 as u16, PLACEHOLDER.1 as u16, &still)?;
            self.last_video_ms = now_ms;
        }
        Ok(())
    }

    fn drain_jitter(&mut self, now: Instant, keyframe: &Keyframes) -> Result<(), RecordError> {
        let ids: Vec<Arc<str>> = self.tracks.keys().cloned().collect();
        for id in ids {
            while let Some(out) = self.tracks.get_mut(&id).and_then(|t| t.jitter.pop(now)) {
                self.process(&id, out, keyframe)?;
            }
        }
        Ok(())
    }

    fn process(
        &mut self,
        id: &Arc<str>,
        out: Out<Packet>,
        keyframe: &Keyframes,
    ) -> Result<(), RecordError> {
        let t = self.tracks.get_mut(id).expect("caller checked");
        match (&mut t.media, out) {
            (
                Media::Audio {
                    decoder,
                    next_sample,
                },
                Out::Packet { item, .. },
            ) => {
                let at = item.timeline_us.max(0) as u64 * audio::RATE as u64 / 1_000_000;
                match decoder.decode(&item.payload) {
                    Ok(pcm) => {
                        self.mixer.add(at, pcm);
                        *next_sample = Some(at + pcm.len() as u64);
                    }
                    Err(e) => debug!(track = %id, error = %e, "undecodable Opus packet"),
                }
            }
            (
                Media::Audio {
                    decoder,
                    next_sample,
                },
                Out::Lost { .. },
            ) => {
                if let Some(at) = *next_sample {
                    let pcm = decoder.conceal()?;
                    self.mixer.add(at, pcm);
                    *next_sample = Some(at + pcm.len() as u64);
                }
            }
            (Media::Video(video), Out::Lost { .. }) => {
                video.lost();
                if self.shown.as_ref() == Some(id) || self.pending.as_ref() == Some(id) {
                    keyframe(id);
                }
            }
            (Media::Video(video), Out::Packet { item, .. }) => {
                let on_screen =
                    self.shown.as_ref() == Some(id) || self.pending.as_ref() == Some(id);
                let frames = match video.push(&item, on_screen) {
                    Ok(f) => f,
                    Err(e) => {
                        debug!(track = %id, error = %e, "bad video packet");
                        return Ok(());
                    }
                };
                let ms = item.timeline_us / 1000;
                for frame in frames {
                    self.show(id, ms, frame)?;
                }
            }
        }
        Ok(())
    }

    /// A frame of track `id`'s video, in the file if it is the one shown.
    fn show(&mut self, id: &Arc<str>, ms: i64, frame: vp8::Frame) -> Result<(), RecordError> {
        if self.pending.as_ref() == Some(id) && frame.keyframe {
            self.shown = self.pending.take();
        }
        if self.shown.as_ref() != Some(id) {
            return Ok(());
        }
        match (self.rollover_since, frame.size) {
            (Some(_), Some((w, h))) => self.rollover(ms, w, h, &frame.data)?,
            _ => {
                if let Some(w) = self.writer.as_mut() {
                    w.video(ms, frame.keyframe, &frame.data)?;
                }
            }
        }
        self.last_video_ms = self.last_video_ms.max(ms);
        Ok(())
    }

    fn write_audio(&mut self, until_frame: u64) -> Result<(), RecordError> {
        for (index, pcm) in self.mixer.take_until(until_frame) {
            let packet = self.encoder.encode(&pcm)?.to_vec();
            if let Some(w) = self.writer.as_mut() {
                w.audio(index as i64 * 20, &packet)?;
            }
        }
        Ok(())
    }

    /// Closes the current segment and starts the next with `keyframe`.
    fn rollover(&mut self, ms: i64, w: u16, h: u16, keyframe: &[u8]) -> Result<(), RecordError> {
        if let Some(old) = self.writer.take() {
            old.finish()?;
            if let Some(u) = &self.uploader {
                let path = self.dir.join(segment_name(self.segment_no));
                u.segment_done(path, self.state.clone());
            }
        }
        self.save_state()?;
        self.new_segment(ms, w, h, keyframe)
    }

    fn new_segment(&mut self, ms: i64, w: u16, h: u16, keyframe: &[u8]) -> Result<(), RecordError> {
        self.segment_no += 1;
        let path = self.dir.join(segment_name(self.segment_no));
        let mut writer = SegmentWriter::create(&path, w, h, self.pre_skip)?;
        writer.video(ms, true, keyframe)?;
        self.writer = Some(writer);
        self.segment_started_ms = ms;
        self.rollover_since = None;
        Ok(())
    }

    /// Writes what is left and closes the last segment.
    fn finish(mut self) -> Result<State, RecordError> {
        let ids: Vec<Arc<str>> = self.tracks.keys().cloned().collect();
        for id in ids {
            let rest = self
                .tracks
                .get_mut(&id)
                .map(|t| t.jitter.drain())
                .unwrap_or_default();
            for out in rest {
                // No room handle at the end: keyframe requests are moot.
                self.process_final(&id, out)?;
            }
        }
        let end = (self.now_us(Instant::now()).max(0) as u64 * audio::RATE as u64 / 1_000_000)
            .div_ceil(audio::FRAME as u64);
        self.write_audio(end)?;
        if let Some(w) = self.writer.take() {
            w.finish()?;
        }
        self.save_state()?;
        Ok(self.state)
    }

    fn process_final(&mut self, id: &Arc<str>, out: Out<Packet>) -> Result<(), RecordError> {
        let t = self.tracks.get_mut(id).expect("caller checked");
        if let (
            Media::Audio {
                decoder,
                next_sample,
            },
            Out::Packet { item, .. },
        ) = (&mut t.media, out)
        {
            let at = item.timeline_us.max(0) as u64 * audio::RATE as u64 / 1_000_000;
            if let Ok(pcm) = decoder.decode(&item.payload) {
                self.mixer.add(at, pcm);
                *next_sample = Some(at + pcm.len() as u64);
            }
        }
        Ok(())
    }
}
