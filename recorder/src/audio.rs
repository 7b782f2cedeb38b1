//! Everyone's audio mixed into one Opus stream: each participant's packets
//! decoded (with loss concealment for gaps), summed on the recording's
//! timeline, limited so loud moments do not clip, and encoded once.

use std::collections::BTreeMap;

pub const RATE: u32 = 48_000;
/// Samples in one 20 ms mono frame.
pub const FRAME: usize = 960;
/// Longest Opus packet: 120 ms.
const MAX_PACKET_SAMPLES: usize = 5760;

#[derive(Debug, thiserror::Error)]
#[error("opus: {0}")]
pub struct AudioError(#[from] opus::Error);

/// One participant's Opus decoder.
pub struct Decoder {
    dec: opus::Decoder,
    buf: Vec<i16>,
    last_len: usize,
}

impl Decoder {
    pub fn new() -> Result<Decoder, AudioError> {
        Ok(Decoder {
            dec: opus::Decoder::new(RATE, opus::Channels::Mono)?,
            buf: vec![0; MAX_PACKET_SAMPLES],
            last_len: FRAME,
        })
    }

    /// Decodes one packet to 48 kHz mono.
    pub fn decode(&mut self, packet: &[u8]) -> Result<&[i16], AudioError> {
        let n = self.dec.decode(packet, &mut self.buf, false)?;
        self.last_len = n.max(1);
        Ok(&self.buf[..n])
    }

    /// Conceals one lost packet (as long as the last one).
    pub fn conceal(&mut self) -> Result<&[i16], AudioError> {
        let len = self.last_len.min(MAX_PACKET_SAMPLES);
        let n = self.dec.decode(&[], &mut self.buf[..len], false)?;
        Ok(&self.buf[..n])
    }
}

/// Sums PCM onto the timeline, in 20 ms frames indexed from the start.
#[derive(Default)]
pub struct Mixer {
    frames: BTreeMap<u64, Box<[i32; FRAME]>>,
    /// Frames before this one were already taken; later adds there are dropped.
    next: u64,
}

impl Mixer {
    /// Adds `pcm` starting at timeline sample `at`.
    pub fn add(&mut self, at: u64, pcm: &[i16]) {
        for (i, s) in pcm.iter().enumerate() {
            let t = at + i as u64;
            let frame = t / FRAME as u64;
            if frame < self.next {
                continue;
            }
            self.frames
                .entry(frame)
                .or_insert_with(|| Box::new([0; FRAME]))[(t % FRAME as u64) as usize] += *s as i32;
        }
    }

    /// Takes the finished frames before `until` (a frame index), silence
    /// where nobody spoke, limited to 16 bits.
    pub fn take_until(&mut self, until: u64) -> Vec<(u64, [i16; FRAME])> {
        let mut out = Vec::new();
        while self.next < until {
            let mut pcm = [0i16; FRAME];
            if let Some(sum) = self.frames.remove(&self.next) {
                for (o, s) in pcm.iter_mut().zip(sum.iter()) {
                    *o = limit(*s);
                }
            }
            out.push((self.next, pcm));
            self.next += 1;
        }
        out
    }

    /// Index of the next frame `take_until` will produce.
    pub fn next_frame(&self) -> u64 {
        self.next
    }
}

/// A soft limiter: linear up to 3/4 of full scale, then a smooth knee
/// towards full scale, so two loud voices together are loud, not clipped.
pub fn limit(x: i32) -> i16 {
    const KNEE: f32 = 24_576.0;
    const FULL: f32 = 32_767.0;
    let v = x as f32;
    let a = v.abs();
    if a <= KNEE {
        return x as i16;
    }
    let over = (a - KNEE) / (FULL - KNEE);
    let y = KNEE + (FULL - KNEE) * over.tanh();
    (y.copysign(v)).round() as i16
}

/// The one encoder of the mix.
pub struct Encoder {
    enc: opus::Encoder,
    out: Vec<u8>,
}

impl Encoder {
    pub fn new(bitrate: i32) -> Result<Encoder, AudioError> {
        let mut enc = opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip)?;
        enc.set_bitrate(opus::Bitrate::Bits(bitrate))?;
        Ok(Encoder {
            enc,
            out: vec![0; 4000],
        })
    }

    /// Samples the decoder must skip at the start (Opus pre-skip).
    pub fn lookahead(&mut self) -> u16 {
        self.enc.get_lookahead().map_or(312, |l| l as u16)
    }

    pub fn encode(&mut self, pcm: &[i16; FRAME]) -> Result<&[u8], AudioError> {
        let n = self.enc.encode(pcm, &mut self.out)?;
        Ok(&self.out[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_is_transparent_below_the_knee_and_never_clips() {
        assert_eq!(limit(1000), 1000);
        assert_eq!(limit(-24_000), -24_000);
        assert!(limit(40_000) < i16::MAX && limit(40_000) > 30_000);
        assert_eq!(limit(10_000_000), 32_767);
        assert_eq!(limit(-10_000_000), -32_767);
        assert!(limit(30_000) < limit(31_000));
    }

    #[test]
    fn mixer_sums_on_the_timeline_with_silence_between() {
        let mut m = Mixer::default();
        m.add(0, &[100; FRAME]);
        m.add(480, &[50; FRAME]); // half a frame later, spills into frame 1
        m.add(3 * FRAME as u64, &[7; 10]);
        let frames = m.take_until(4);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0].1[0], 100);
        assert_eq!(frames[0].1[500], 150);
        assert_eq!(frames[1].1[0], 50);
        assert_eq!(frames[1].1[500], 0);
        assert!(frames[2].1.iter().all(|s| *s == 0));
        assert_eq!(frames[3].1[9], 7);
        // Too late for frames already taken.
        m.add(0, &[1; 10]);
        assert!(m.take_until(5)[0].1.iter().all(|s| *s == 0));
    }

    #[test]
    fn encode_decode_round_trip_keeps_a_tone() {
        let mut enc = Encoder::new(48_000).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut energy = 0f64;
        for f in 0..20 {
            let mut pcm = [0i16; FRAME];
            for (i, s) in pcm.iter_mut().enumerate() {
                let t = (f * FRAME + i) as f64 / RATE as f64;
                *s = (8000.0 * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16;
            }
            let packet = enc.encode(&pcm).unwrap().to_vec();
            let out = dec.decode(&packet).unwrap();
            assert_eq!(out.len(), FRAME);
            if f > 5 {
                energy += out.iter().map(|s| (*s as f64).powi(2)).sum::<f64>();
            }
        }
        assert!(energy > 1e9, "tone lost: {energy}");
        assert_eq!(dec.conceal().unwrap().len(), FRAME);
    }
}
