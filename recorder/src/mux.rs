//! WebM files through FFmpeg's muxer (ffmpeg-next): one VP8 video stream
//! (forwarded frames; only H.264 is re-encoded, by [`crate::transcode`])
//! and one Opus stream (the mix).
//!
//! A recording is written as self-contained segment files, each starting
//! with a video keyframe, with timestamps counted from the start of the
//! recording; [`concat`] copies them into the final file without decoding.

use ffmpeg_next as ffmpeg;
use ffmpeg_next::ffi;
use std::path::{Path, PathBuf};
use std::sync::Once;

#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct MuxError {
    context: String,
    source: ffmpeg::Error,
}

impl MuxError {
    pub(crate) fn new(context: impl Into<String>, source: ffmpeg::Error) -> MuxError {
        MuxError {
            context: context.into(),
            source,
        }
    }
}

pub(crate) fn ctx<T>(
    r: Result<T, ffmpeg::Error>,
    context: impl Into<String>,
) -> Result<T, MuxError> {
    r.map_err(|source| MuxError {
        context: context.into(),
        source,
    })
}

/// Milliseconds: the time base we hand to the muxer.
const MS: (i32, i32) = (1, 1000);

pub(crate) fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = ffmpeg::init();
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Error);
    });
}

/// The Opus identification header (RFC 7845 5.1) Matroska stores as the
/// codec's private data: mono, 48 kHz.
fn opus_head(pre_skip: u16) -> [u8; 19] {
    let mut h = [0u8; 19];
    h[..8].copy_from_slice(b"OpusHead");
    h[8] = 1; // version
    h[9] = 1; // channels
    h[10..12].copy_from_slice(&pre_skip.to_le_bytes());
    h[12..16].copy_from_slice(&48_000u32.to_le_bytes());
    // output gain 0, mapping family 0
    h
}

pub struct SegmentWriter {
    path: PathBuf,
    out: ffmpeg::format::context::Output,
    video: usize,
    audio: usize,
    video_tb: ffmpeg::Rational,
    audio_tb: ffmpeg::Rational,
    last_video: Option<i64>,
    last_audio: Option<i64>,
    pub first_ms: Option<i64>,
    pub last_ms: i64,
}

impl SegmentWriter {
    /// Starts a WebM file whose video is `width`×`height` (the size of its
    /// first keyframe; later keyframes may change it).
    pub fn create(
        path: &Path,
        width: u16,
        height: u16,
        pre_skip: u16,
    ) -> Result<SegmentWriter, MuxError> {
        init();
        let mut out = ctx(
            ffmpeg::format::output_as(path, "webm"),
            format!("create {}", path.display()),
        )?;
        let video = {
            let mut s = ctx(out.add_stream(ffmpeg::codec::Id::VP8), "add video stream")?;
            s.set_time_base(MS);
            // SAFETY: the stream was just created by this context and its
            // codecpar is allocated by FFmpeg; we set plain fields.
            unsafe {
                let par = (*s.as_mut_ptr()).codecpar;
                (*par).codec_type = ffi::AVMediaType::AVMEDIA_TYPE_VIDEO;
                (*par).codec_id = ffi::AVCodecID::AV_CODEC_ID_VP8;
                (*par).width = width.into();
                (*par).height = height.into();
            }
            s.index()
        };
        let audio = {
            let mut s = ctx(out.add_stream(ffmpeg::codec::Id::OPUS), "add audio stream")?;
            s.set_time_base(MS);
            let head = opus_head(pre_skip);
            // SAFETY: as above; extradata is allocated with FFmpeg's allocator
            // (with the padding it requires) and owned by codecpar from here.
            unsafe {
                let par = (*s.as_mut_ptr()).codecpar;
                (*par).codec_type = ffi::AVMediaType::AVMEDIA_TYPE_AUDIO;
                (*par).codec_id = ffi::AVCodecID::AV_CODEC_ID_OPUS;
                (*par).sample_rate = 48_000;
                ffi::av_channel_layout_default(&mut (*par).ch_layout, 1);
                let pad = ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
                let buf = ffi::av_mallocz(head.len() + pad) as *mut u8;
                std::ptr::copy_nonoverlapping(head.as_ptr(), buf, head.len());
                (*par).extradata = buf;
                (*par).extradata_size = head.len() as i32;
            }
            s.index()
        };
        ctx(out.write_header(), "write WebM header")?;
        let video_tb = out.stream(video).expect("added").time_base();
        let audio_tb = out.stream(audio).expect("added").time_base();
        Ok(SegmentWriter {
            path: path.to_owned(),
            out,
            video,
            audio,
            video_tb,
            audio_tb,
            last_video: None,
            last_audio: None,
            first_ms: None,
            last_ms: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a video frame at `ms` from the start of the recording.
    pub fn video(&mut self, ms: i64, keyframe: bool, data: &[u8]) -> Result<(), MuxError> {
        // Timestamps must rise; a frame that would not is nudged.
        let ms = self.last_video.map_or(ms, |l| ms.max(l + 1));
        self.last_video = Some(ms);
        self.write(self.video, self.video_tb, ms, keyframe, data)
    }

    /// Writes a 20 ms Opus packet starting at `ms`.
    pub fn audio(&mut self, ms: i64, data: &[u8]) -> Result<(), MuxError> {
        let ms = self.last_audio.map_or(ms, |l| ms.max(l + 1));
        self.last_audio = Some(ms);
        self.write(self.audio, self.audio_tb, ms, true, data)
    }

    fn write(
        &mut self,
        stream: usize,
        tb: ffmpeg::Rational,
        ms: i64,
        key: bool,
        data: &[u8],
    ) -> Result<(), MuxError> {
        self.first_ms.get_or_insert(ms);
        self.last_ms = self.last_ms.max(ms);
        let mut p = ffmpeg::Packet::copy(data);
        p.set_stream(stream);
        p.set_pts(Some(ms));
        p.set_dts(Some(ms));
        if stream == self.audio {
            p.set_duration(20);
        }
        if key {
            p.set_flags(ffmpeg::codec::packet::Flags::KEY);
        }
        p.rescale_ts(MS, tb);
        ctx(p.write_interleaved(&mut self.out), "write packet")
    }

    /// Writes the trailer: the file is complete and playable.
    pub fn finish(mut self) -> Result<PathBuf, MuxError> {
        ctx(self.out.write_trailer(), "write WebM trailer")?;
        Ok(self.path)
    }
}

/// Copies the segments, in order, into one WebM file without decoding.
/// Returns the duration in milliseconds. A segment that cannot be read
/// (cut short by a crash) contributes what it holds.
pub fn concat(segments: &[PathBuf], out_path: &Path) -> Result<i64, MuxError> {
    init();
    let first = segments.first().ok_or(MuxError {
        context: "concat".into(),
        source: ffmpeg::Error::InvalidData,
    })?;
    let mut out = ctx(
        ffmpeg::format::output_as(out_path, "webm"),
        format!("create {}", out_path.display()),
    )?;
    {
        let input = ctx(
            ffmpeg::format::input(first),
            format!("open {}", first.display()),
        )?;
        for s in input.streams() {
            let mut o = ctx(out.add_stream(ffmpeg::codec::Id::None), "add stream")?;
            o.set_parameters(s.parameters());
            o.set_time_base(MS);
            // SAFETY: codec_tag from another container must be cleared.
            unsafe {
                (*(*o.as_mut_ptr()).codecpar).codec_tag = 0;
            }
        }
    }
    ctx(out.write_header(), "write WebM header")?;
    let out_tb: Vec<ffmpeg::Rational> = out.streams().map(|s| s.time_base()).collect();
    let mut last = vec![i64::MIN; out_tb.len()];
    let mut end_ms = 0i64;
    for seg in segments {
        let Ok(mut input) = ffmpeg::format::input(seg) else {
            tracing::warn!(segment = %seg.display(), "unreadable segment skipped");
            continue;
        };
        let in_tb: Vec<ffmpeg::Rational> = input.streams().map(|s| s.time_base()).collect();
        for (stream, mut packet) in input.packets() {
            let i = stream.index();
            if i >= out_tb.len() {
                continue;
            }
            packet.rescale_ts(in_tb[i], out_tb[i]);
            // Overlapping segments (a crash restarted one) must not go back in time.
            let pts = packet.pts().unwrap_or(0);
            if pts <= last[i] {
                continue;
            }
            last[i] = pts;
            let ms =
                pts * 1000 * out_tb[i].numerator() as i64 / out_tb[i].denominator().max(1) as i64;
            end_ms = end_ms.max(ms + if i == 1 { 20 } else { 0 });
            packet.set_stream(i);
            packet.set_position(-1);
            ctx(packet.write_interleaved(&mut out), "write packet")?;
        }
    }
    ctx(out.write_trailer(), "write WebM trailer")?;
    Ok(end_ms)
}

/// A still picture for when nobody's video can be shown: one VP8 keyframe
/// of a dark grey `width`×`height` image, encoded once with libvpx.
/// A real-time VP8 encoder (libvpx) for `w`×`h` pictures, timestamps in
/// milliseconds: a frame in, a frame out.
pub(crate) fn vp8_encoder(
    w: u32,
    h: u32,
    bit_rate: usize,
) -> Result<ffmpeg::encoder::Video, MuxError> {
    use ffmpeg::util::format::Pixel;
    init();
    let codec = ffmpeg::encoder::find(ffmpeg::codec::Id::VP8).ok_or_else(|| {
        MuxError::new(
            "no VP8 encoder in this FFmpeg",
            ffmpeg::Error::EncoderNotFound,
        )
    })?;
    let mut enc = ctx(
        ffmpeg::codec::context::Context::new_with_codec(codec)
            .encoder()
            .video(),
        "VP8 encoder",
    )?;
    enc.set_width(w);
    enc.set_height(h);
    enc.set_format(Pixel::YUV420P);
    enc.set_time_base(MS);
    enc.set_bit_rate(bit_rate);
    enc.set_max_b_frames(0);
    // Keyframes come when asked for, and at least every 10 s at 30 fps so
    // that a seek never has far to go.
    enc.set_gop(300);
    let mut options = ffmpeg::Dictionary::new();
    // Realtime, fastest, no look-ahead. For H.264 made VP8 at 640×480 and
    // 30 fps, decoding and encoding take 5.8 CPU-s per minute (8.7 with
    // cpu-used 8, for no visible gain at 1 Mbit/s).
    options.set("deadline", "realtime");
    options.set("cpu-used", "16");
    options.set("lag-in-frames", "0");
    ctx(enc.open_as_with(codec, options), "open VP8 encoder")
}

pub fn placeholder_keyframe(width: u32, height: u32) -> Result<Vec<u8>, MuxError> {
    use ffmpeg::util::format::Pixel;
    init();
    let mut enc = vp8_encoder(width, height, 200_000)?;
    let mut frame = ffmpeg::frame::Video::new(Pixel::YUV420P, width, height);
    for (plane, value) in [(0, 40u8), (1, 128), (2, 128)] {
        frame.data_mut(plane).fill(value);
    }
    frame.set_pts(Some(0));
    ctx(enc.send_frame(&frame), "encode placeholder")?;
    ctx(enc.send_eof(), "flush placeholder")?;
    let mut packet = ffmpeg::Packet::empty();
    ctx(enc.receive_packet(&mut packet), "placeholder packet")?;
    Ok(packet.data().unwrap_or_default().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_is_a_keyframe_of_the_asked_size() {
        let k = placeholder_keyframe(640, 360).unwrap();
        assert_eq!(crate::vp8::keyframe_info(&k), Some((640, 360)));
    }
}
