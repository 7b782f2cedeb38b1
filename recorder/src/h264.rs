//! H.264 access units out of RTP (RFC 6184: single NAL units, STAP-A and
//! FU-A, which is what browsers send), in Annex B form for the decoder. As
//! with VP8, a frame with a packet missing is dropped, and so is everything
//! after it until the next IDR picture.

const START: [u8; 4] = [0, 0, 0, 1];
const STAP_A: u8 = 24;
const FU_A: u8 = 28;
const IDR: u8 = 5;

#[derive(Debug, PartialEq)]
pub struct Frame {
    pub rtp_ts: u32,
    /// Holds an IDR picture: decoding can start here.
    pub keyframe: bool,
    /// Annex B: each NAL unit after a start code.
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum H264Error {
    #[error("H.264 payload truncated")]
    Truncated,
    #[error("H.264 packetization {0} is not supported (only single NAL, STAP-A, FU-A)")]
    Unsupported(u8),
}

struct Building {
    rtp_ts: u32,
    data: Vec<u8>,
    keyframe: bool,
    /// Inside a fragmented NAL unit.
    in_fragment: bool,
}

#[derive(Default)]
pub struct Depacketizer {
    building: Option<Building>,
    /// A packet went missing: drop until an IDR picture.
    broken: bool,
    started: bool,
}

impl Depacketizer {
    /// Feeds the next packet in sequence order; returns a frame when one
    /// completes (at the marker bit).
    pub fn push(
        &mut self,
        payload: &[u8],
        rtp_ts: u32,
        marker: bool,
    ) -> Result<Option<Frame>, H264Error> {
        let header = *payload.first().ok_or(H264Error::Truncated)?;
        if self.building.as_ref().is_some_and(|b| b.rtp_ts != rtp_ts) {
            // The last frame never saw its marker: its end was lost.
            self.building = None;
            self.broken = true;
        }
        let b = self.building.get_or_insert_with(|| Building {
            rtp_ts,
            data: Vec::new(),
            keyframe: false,
            in_fragment: false,
        });
        match header & 0x1f {
            t @ 1..=23 => {
                b.keyframe |= t == IDR;
                b.data.extend_from_slice(&START);
                b.data.extend_from_slice(payload);
            }
            STAP_A => {
                let mut rest = &payload[1..];
                while !rest.is_empty() {
                    let [hi, lo, ..] = *rest else {
                        return Err(self.refuse(H264Error::Truncated));
                    };
                    let size = u16::from_be_bytes([hi, lo]) as usize;
                    let Some(nal) = rest.get(2..2 + size).filter(|n| !n.is_empty()) else {
                        return Err(self.refuse(H264Error::Truncated));
                    };
                    let b = self.building.as_mut().expect("inserted above");
                    b.keyframe |= nal[0] & 0x1f == IDR;
                    b.data.extend_from_slice(&START);
                    b.data.extend_from_slice(nal);
                    rest = &rest[2 + size..];
                }
            }
            FU_A => {
                let Some(&fu) = payload.get(1) else {
                    return Err(self.refuse(H264Error::Truncated));
                };
                let (start, end, kind) = (fu & 0x80 != 0, fu & 0x40 != 0, fu & 0x1f);
                if start {
                    b.keyframe |= kind == IDR;
                    b.data.extend_from_slice(&START);
                    b.data.push((header & 0xe0) | kind);
                    b.in_fragment = true;
                } else if !b.in_fragment {
                    // A middle without its start: that start was lost.
                    self.building = None;
                    self.broken = true;
                    return Ok(None);
                }
                let b = self.building.as_mut().expect("inserted above");
                b.data.extend_from_slice(&payload[2..]);
                b.in_fragment = !end;
            }
            other => return Err(self.refuse(H264Error::Unsupported(other))),
        }
        if !marker {
            return Ok(None);
        }
        let b = self.building.take().expect("inserted above");
        if b.in_fragment || (!b.keyframe && (self.broken || !self.started)) {
            if b.in_fragment {
                self.broken = true;
            }
            return Ok(None);
        }
        self.broken = false;
        self.started = true;
        Ok(Some(Frame {
            rtp_ts: b.rtp_ts,
            keyframe: b.keyframe,
            data: b.data,
        }))
    }

    /// A bad packet spoils its frame.
    fn refuse(&mut self, e: H264Error) -> H264Error {
        self.building = None;
        self.broken = true;
        e
    }

    /// A packet is missing: the frame being built is lost, and the stream
    /// is undecodable until the next IDR picture.
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

    const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1f];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

    fn stap(nals: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![0x78];
        for n in nals {
            p.extend_from_slice(&(n.len() as u16).to_be_bytes());
            p.extend_from_slice(n);
        }
        p
    }

    /// FU-A packets of one NAL unit, `chunk` bytes of it each.
    fn fragments(nal: &[u8], chunk: usize) -> Vec<Vec<u8>> {
        let body = &nal[1..];
        let n = body.len().div_ceil(chunk);
        body.chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let mut fu = nal[0] & 0x1f;
                if i == 0 {
                    fu |= 0x80;
                }
                if i == n - 1 {
                    fu |= 0x40;
                }
                let mut p = vec![(nal[0] & 0xe0) | FU_A, fu];
                p.extend_from_slice(c);
                p
            })
            .collect()
    }

    fn annex_b(nals: &[&[u8]]) -> Vec<u8> {
        nals.iter().flat_map(|n| [&START[..], n].concat()).collect()
    }

    #[test]
    fn reassembles_a_keyframe_and_a_delta() {
        let mut d = Depacketizer::default();
        let idr: Vec<u8> = [0x65].into_iter().chain(1..=200u8).collect();
        assert_eq!(d.push(&stap(&[SPS, PPS]), 90, false).unwrap(), None);
        let parts = fragments(&idr, 64);
        let n = parts.len();
        let mut out = None;
        for (i, p) in parts.iter().enumerate() {
            out = d.push(p, 90, i == n - 1).unwrap();
        }
        let f = out.unwrap();
        assert!(f.keyframe);
        assert_eq!(f.data, annex_b(&[SPS, PPS, &idr]));
        let delta = [0x41, 9, 9, 9];
        let f = d.push(&delta, 3090, true).unwrap().unwrap();
        assert!(!f.keyframe);
        assert_eq!(f.data, annex_b(&[&delta]));
    }

    #[test]
    fn a_loss_drops_frames_until_an_idr() {
        let mut d = Depacketizer::default();
        let delta = [0x41, 1, 2, 3];
        // Nothing before the first keyframe.
        assert_eq!(d.push(&delta, 1, true).unwrap(), None);
        assert!(d.needs_keyframe());
        assert!(d.push(&[0x65, 1, 2], 2, true).unwrap().is_some());
        let big: Vec<u8> = [0x41].into_iter().chain(0..100u8).collect();
        let parts = fragments(&big, 30);
        d.push(&parts[0], 3, false).unwrap();
        d.lost();
        assert_eq!(d.push(&parts[2], 3, false).unwrap(), None);
        assert_eq!(d.push(&delta, 4, true).unwrap(), None);
        assert!(d.needs_keyframe());
        assert!(d.push(&[0x65, 4, 5], 5, true).unwrap().unwrap().keyframe);
        assert!(!d.needs_keyframe());
        // A frame whose marker never came is dropped when the next begins.
        assert_eq!(d.push(&delta, 6, false).unwrap(), None);
        assert_eq!(d.push(&delta, 7, true).unwrap(), None);
        assert!(d.needs_keyframe());
    }

    #[test]
    fn hostile_payloads_are_errors_not_panics() {
        let mut d = Depacketizer::default();
        assert_eq!(d.push(&[], 0, true), Err(H264Error::Truncated));
        assert_eq!(d.push(&[0x7c], 0, true), Err(H264Error::Truncated));
        assert_eq!(d.push(&[0x78, 0x00], 0, true), Err(H264Error::Truncated));
        assert_eq!(
            d.push(&[0x78, 0x00, 0x09, 1], 0, true),
            Err(H264Error::Truncated)
        );
        assert_eq!(d.push(&[0x79, 0], 0, true), Err(H264Error::Unsupported(25)));
        assert!(d.needs_keyframe());
    }
}
