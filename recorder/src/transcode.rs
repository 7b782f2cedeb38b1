//! H.264 video into VP8, for recordings: WebM holds VP8 but not H.264, and
//! a client that can only send H.264 (some Safari and hardware-encoder
//! set-ups) must still be seen. Only the video shown in the recording is
//! transcoded, so the cost is one decoder and one encoder per recording at
//! most, paid while an H.264 publisher is on screen.

use crate::mux::{MuxError, ctx, init, vp8_encoder};
use crate::vp8;
use ffmpeg::util::format::Pixel;
use ffmpeg_next as ffmpeg;

/// Bit rate of the VP8 made: about what a browser sends at 640×480.
const BIT_RATE: usize = 1_000_000;

pub struct Transcoder {
    decoder: ffmpeg::decoder::Video,
    /// Opened for the size of the pictures coming in.
    encoder: Option<(ffmpeg::encoder::Video, u32, u32)>,
    force_keyframe: bool,
    last_pts: i64,
}

impl Transcoder {
    pub fn new() -> Result<Transcoder, MuxError> {
        init();
        let codec = ffmpeg::decoder::find(ffmpeg::codec::Id::H264).ok_or_else(|| {
            MuxError::new(
                "no H.264 decoder in this FFmpeg",
                ffmpeg::Error::DecoderNotFound,
            )
        })?;
        let mut context = ffmpeg::codec::context::Context::new_with_codec(codec);
        // One thread: frame threading would hold pictures back by a frame
        // per thread, and slices are enough at meeting resolutions.
        context.set_threading(ffmpeg::threading::Config {
            kind: ffmpeg::threading::Type::Slice,
            count: 1,
            ..Default::default()
        });
        let decoder = ctx(context.decoder().video(), "open H.264 decoder")?;
        Ok(Transcoder {
            decoder,
            encoder: None,
            force_keyframe: true,
            last_pts: -1,
        })
    }

    /// The next frame out is a keyframe (a new segment, or this video just
    /// went on screen).
    pub fn request_keyframe(&mut self) {
        self.force_keyframe = true;
    }

    /// Decodes one access unit (Annex B) and encodes what it shows; `ms` is
    /// its time on the recording's timeline.
    pub fn push(&mut self, access_unit: &[u8], ms: i64) -> Result<Vec<vp8::Frame>, MuxError> {
        let packet = ffmpeg::Packet::copy(access_unit);
        // A broken unit is the publisher's problem, not the recording's:
        // skip it, the decoder recovers at the next IDR.
        if self.decoder.send_packet(&packet).is_err() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut picture = ffmpeg::frame::Video::empty();
        while self.decoder.receive_frame(&mut picture).is_ok() {
            self.encode(&mut picture, ms, &mut out)?;
        }
        Ok(out)
    }

    fn encode(
        &mut self,
        picture: &mut ffmpeg::frame::Video,
        ms: i64,
        out: &mut Vec<vp8::Frame>,
    ) -> Result<(), MuxError> {
        match picture.format() {
            Pixel::YUV420P => {}
            // The same planes, with full-range levels: close enough for a
            // recording, and no scaler needed.
            Pixel::YUVJ420P => picture.set_format(Pixel::YUV420P),
            other => {
                return Err(MuxError::new(
                    format!("H.264 in {other:?} is not supported"),
                    ffmpeg::Error::PatchWelcome,
                ));
            }
        }
        let (w, h) = (picture.width(), picture.height());
        if self
            .encoder
            .as_ref()
            .is_none_or(|(_, ew, eh)| (*ew, *eh) != (w, h))
        {
            self.encoder = Some((vp8_encoder(w, h, BIT_RATE)?, w, h));
            self.force_keyframe = true;
        }
        let (encoder, _, _) = self.encoder.as_mut().expect("opened above");
        // The encoder needs rising timestamps; two pictures in one
        // millisecond are one apart.
        let pts = ms.max(self.last_pts + 1);
        self.last_pts = pts;
        picture.set_pts(Some(pts));
        picture.set_kind(if std::mem::take(&mut self.force_keyframe) {
            ffmpeg::picture::Type::I
        } else {
            ffmpeg::picture::Type::None
        });
        ctx(encoder.send_frame(picture), "encode VP8")?;
        let mut packet = ffmpeg::Packet::empty();
        while encoder.receive_packet(&mut packet).is_ok() {
            let data = packet.data().unwrap_or_default().to_vec();
            let size = vp8::keyframe_info(&data);
            out.push(vp8::Frame {
                rtp_ts: 0,
                keyframe: size.is_some(),
                size,
                data,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H.264 access units from the ffmpeg tool (baseline, as browsers
    /// send), split at access unit delimiters.
    fn h264_units(seconds: u32) -> Vec<Vec<u8>> {
        let path =
            std::env::temp_dir().join(format!("confer-h264-{:016x}.h264", rand::random::<u64>()));
        let status = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
            .arg(format!("testsrc=size=320x240:rate=30:duration={seconds}"))
            .args([
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                "-profile:v",
                "baseline",
                "-g",
                "30",
                "-bsf:v",
                "h264_metadata=aud=insert",
                "-f",
                "h264",
            ])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let data = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        split_access_units(&data)
    }

    /// Splits an Annex B stream before each access unit delimiter (type 9).
    fn split_access_units(data: &[u8]) -> Vec<Vec<u8>> {
        let mut starts = Vec::new();
        for i in 0..data.len().saturating_sub(4) {
            if data[i..i + 4] == [0, 0, 0, 1] && data[i + 4] & 0x1f == 9 {
                starts.push(i);
            }
        }
        starts.push(data.len());
        starts
            .windows(2)
            .map(|w| data[w[0]..w[1]].to_vec())
            .collect()
    }

    #[test]
    fn h264_becomes_vp8_with_keyframes_when_asked() {
        let units = h264_units(2);
        assert_eq!(units.len(), 60);
        let mut t = Transcoder::new().unwrap();
        let mut frames = Vec::new();
        for (i, u) in units.iter().enumerate() {
            if i == 45 {
                t.request_keyframe();
            }
            for f in t.push(u, i as i64 * 33).unwrap() {
                frames.push((i, f));
            }
        }
        // A frame out for every frame in, at once (no look-ahead).
        assert_eq!(frames.len(), 60);
        assert!(frames.iter().all(|(i, f)| f.data.len() > 10 && *i < 60));
        let keys: Vec<usize> = frames
            .iter()
            .filter(|(_, f)| f.keyframe)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(keys, [0, 45]);
        assert_eq!(frames[0].1.size, Some((320, 240)));
        // Garbage in is skipped, not an error.
        assert!(
            t.push(&[0, 0, 0, 1, 0x41, 0xff, 0xff], 2000)
                .unwrap()
                .is_empty()
        );
    }
}
