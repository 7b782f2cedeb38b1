//! VP8 frames out of RTP (RFC 7741). A frame with a packet missing is
//! dropped, and so is everything after it until the next keyframe: a
//! decoder fed a broken reference shows garbage, while a gap shows as the
//! previous picture held for a moment.

#[derive(Debug, PartialEq)]
pub struct Frame {
    pub rtp_ts: u32,
    pub keyframe: bool,
    /// From a keyframe's header.
    pub size: Option<(u16, u16)>,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Vp8Error {
    #[error("VP8 payload descriptor truncated")]
    Truncated,
}

#[derive(Default)]
pub struct Depacketizer {
    building: Option<(u32, Vec<u8>)>,
    /// A packet went missing: drop until a keyframe starts.
    broken: bool,
    started: bool,
}

/// Length of the payload descriptor at the start of `p`, and whether this
/// packet starts a frame (S=1, partition 0).
fn descriptor(p: &[u8]) -> Result<(usize, bool), Vp8Error> {
    let first = *p.first().ok_or(Vp8Error::Truncated)?;
    let starts = first & 0x10 != 0 && first & 0x07 == 0;
    let mut n = 1;
    if first & 0x80 != 0 {
        let x = *p.get(n).ok_or(Vp8Error::Truncated)?;
        n += 1;
        if x & 0x80 != 0 {
            let pic = *p.get(n).ok_or(Vp8Error::Truncated)?;
            n += if pic & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            n += 1;
        }
        if x & 0x30 != 0 {
            n += 1;
        }
    }
    if n > p.len() {
        return Err(Vp8Error::Truncated);
    }
    Ok((n, starts))
}

/// Whether a frame is a keyframe, and its size if so (RFC 6386 9.1).
pub fn keyframe_info(frame: &[u8]) -> Option<(u16, u16)> {
    if frame.len() < 10 || frame[0] & 0x01 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let h = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    Some((w, h))
}

impl Depacketizer {
    /// Feeds the next packet in sequence order; returns a frame when one completes.
    pub fn push(
        &mut self,
        payload: &[u8],
        rtp_ts: u32,
        marker: bool,
    ) -> Result<Option<Frame>, Vp8Error> {
        let (skip, starts) = descriptor(payload)?;
        let data = &payload[skip..];
        if starts {
            // A new frame begins; an unfinished one before it lost its end.
            if self.building.is_some() {
                self.broken = true;
            }
            // The frame tag's first bit says keyframe (0) or not.
            let key = data.first().is_some_and(|b| b & 0x01 == 0);
            if !key && (self.broken || !self.started) {
                self.building = None;
                return Ok(None);
            }
            self.broken = false;
            self.started = true;
            self.building = Some((rtp_ts, data.to_vec()));
        } else {
            match &mut self.building {
                Some((ts, buf)) if *ts == rtp_ts => buf.extend_from_slice(data),
                _ => {
                    self.building = None;
                    return Ok(None);
                }
            }
        }
        if !marker {
            return Ok(None);
        }
        let (rtp_ts, data) = self.building.take().expect("set above");
        let size = keyframe_info(&data);
        Ok(Some(Frame {
            rtp_ts,
            keyframe: size.is_some(),
            size,
            data,
        }))
    }

    /// A packet is missing: the frame being built is lost, and the stream
    /// is undecodable until the next keyframe.
    pub fn lost(&mut self) {
        self.building = None;
        self.broken = true;
    }

    /// Whether the stream waits for a keyframe (ask the publisher for one).
    pub fn needs_keyframe(&self) -> bool {
        self.broken || !self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(w: u16, h: u16) -> Vec<u8> {
        let mut f = vec![0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a];
        f.extend_from_slice(&w.to_le_bytes());
        f.extend_from_slice(&h.to_le_bytes());
        f.extend_from_slice(&[7; 20]);
        f
    }

    /// Packets of one frame: descriptor with a 15-bit picture id, then the data.
    fn packets(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        frame
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let mut p = vec![if i == 0 { 0x90 } else { 0x80 }, 0x80, 0x81, 0x23];
                p.extend_from_slice(c);
                p
            })
            .collect()
    }

    #[test]
    fn reassembles_frames_and_reads_keyframe_size() {
        let mut d = Depacketizer::default();
        let k = key(640, 480);
        let ps = packets(&k, 8);
        let n = ps.len();
        let mut out = None;
        for (i, p) in ps.iter().enumerate() {
            out = d.push(p, 3000, i == n - 1).unwrap();
        }
        let f = out.unwrap();
        assert_eq!(f.data, k);
        assert!(f.keyframe);
        assert_eq!(f.size, Some((640, 480)));
        // A delta frame follows.
        let delta = vec![0x01, 9, 9, 9];
        let f = d
            .push(&packets(&delta, 100)[0], 6000, true)
            .unwrap()
            .unwrap();
        assert!(!f.keyframe && f.data == delta);
    }

    #[test]
    fn a_loss_drops_frames_until_a_keyframe() {
        let mut d = Depacketizer::default();
        let delta = vec![0x01, 9, 9, 9, 9, 9];
        // Nothing before the first keyframe.
        assert_eq!(d.push(&packets(&delta, 100)[0], 1, true).unwrap(), None);
        assert!(d.needs_keyframe());
        let k = key(320, 240);
        assert!(d.push(&packets(&k, 100)[0], 2, true).unwrap().is_some());
        let two = packets(&delta, 3);
        d.push(&two[0], 3, false).unwrap();
        d.lost();
        assert_eq!(d.push(&two[1], 3, true).unwrap(), None);
        assert_eq!(d.push(&packets(&delta, 100)[0], 4, true).unwrap(), None);
        assert!(d.needs_keyframe());
        assert!(
            d.push(&packets(&k, 100)[0], 5, true)
                .unwrap()
                .unwrap()
                .keyframe
        );
        assert!(!d.needs_keyframe());
    }

    #[test]
    fn truncated_descriptors_are_errors() {
        let mut d = Depacketizer::default();
        assert_eq!(d.push(&[], 0, true), Err(Vp8Error::Truncated));
        assert_eq!(d.push(&[0x80], 0, true), Err(Vp8Error::Truncated));
        assert_eq!(
            d.push(&[0x80, 0x80, 0x80], 0, true),
            Err(Vp8Error::Truncated)
        );
    }
}
