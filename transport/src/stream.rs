//! One outgoing RTP stream (a forwarded track to one client).
//!
//! Each stream protects its packets with an SRTP context of its own, made
//! from the connection's keys: SRTP keeps its per-SSRC state (the rollover
//! counter) per stream anyway, and so streams sent from different tasks
//! share no lock. It keeps the last packets it sent to answer NACKs with
//! retransmissions on its RTX stream (RFC 4588): a retransmission with the
//! same SSRC and sequence number would reuse the AES-GCM nonce with
//! different bytes (a new transport-wide sequence number), which must never
//! happen. It also counts what it sent, for sender reports.

use bytes::{BufMut, Bytes, BytesMut};
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp::packet::Packet;
use rtc::shared::marshal::{Marshal, MarshalSize};
use std::time::{Duration, Instant, SystemTime};

use crate::Error;
use crate::seal::{Sealer, TAG_LEN};

/// Where a stream's retransmissions go.
#[derive(Clone, Copy, Debug)]
pub struct Rtx {
    pub ssrc: u32,
    pub payload_type: u8,
}

/// A packet kept for retransmission: what it was sent as, less the
/// transport-wide sequence number (a retransmission gets a new one).
struct Kept {
    packet: Packet,
    sent: Instant,
}

pub struct OutStream {
    ssrc: u32,
    clock_rate: u32,
    sealer: Sealer,
    rtx: Option<Rtx>,
    rtx_sequence: u16,
    kept: Box<[Option<Kept>]>,
    /// Reused for every packet: marshalled, then sealed there.
    scratch: Vec<u8>,
    packets: u32,
    octets: u32,
    /// The last packet's RTP time and when it left, which map RTP time to
    /// wallclock in sender reports.
    last: Option<(u32, Instant)>,
}

/// Retransmissions are useless once the receiver has given the frame up;
/// libwebrtc keeps max(1 s, 3 RTT).
const KEEP_FOR: Duration = Duration::from_millis(1000);

impl OutStream {
    /// `keep` packets are kept for retransmission (0: none, as for audio
    /// without RTX).
    pub fn new(ssrc: u32, clock_rate: u32, sealer: Sealer, rtx: Option<Rtx>, keep: usize) -> Self {
        let keep = if rtx.is_some() { keep } else { 0 };
        Self {
            ssrc,
            clock_rate,
            sealer,
            rtx,
            rtx_sequence: rand::random(),
            kept: (0..keep).map(|_| None).collect(),
            scratch: Vec::with_capacity(1500),
            packets: 0,
            octets: 0,
            last: None,
        }
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Protects `packet` (already carrying this stream's SSRC, sequence
    /// numbers and header extensions) and keeps it for retransmission.
    pub fn send(&mut self, packet: Packet, now: Instant) -> Result<&[u8], Error> {
        let len = self.protect(&packet)?;
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(packet.payload.len() as u32);
        self.last = Some((packet.header.timestamp, now));
        if !self.kept.is_empty() {
            let slot = packet.header.sequence_number as usize % self.kept.len();
            self.kept[slot] = Some(Kept { packet, sent: now });
        }
        Ok(&self.scratch[..len])
    }

    /// The RTX packet that retransmits `sequence`, if it is still kept.
    /// `extend` sets header extensions of the retransmission (its own
    /// transport-wide sequence number) before it is protected.
    pub fn retransmit(
        &mut self,
        sequence: u16,
        now: Instant,
        extend: impl FnOnce(&mut Packet),
    ) -> Option<Result<&[u8], Error>> {
        let rtx = self.rtx?;
        let slot = sequence as usize % self.kept.len().max(1);
        let kept = self.kept.get(slot)?.as_ref()?;
        if kept.packet.header.sequence_number != sequence
            || now.saturating_duration_since(kept.sent) > KEEP_FOR
        {
            return None;
        }
        let mut out = kept.packet.clone();
        let mut payload = BytesMut::with_capacity(2 + out.payload.len());
        payload.put_u16(sequence);
        payload.extend_from_slice(&out.payload);
        out.payload = payload.freeze();
        out.header.ssrc = rtx.ssrc;
        out.header.payload_type = rtx.payload_type;
        out.header.sequence_number = self.rtx_sequence;
        // RFC 4588 §4: padding is not retransmitted.
        out.header.padding = false;
        self.rtx_sequence = self.rtx_sequence.wrapping_add(1);
        extend(&mut out);
        Some(self.protect(&out).map(|len| &self.scratch[..len]))
    }

    /// Marshals and protects `packet` into `scratch`; its length there.
    fn protect(&mut self, packet: &Packet) -> Result<usize, Error> {
        self.scratch.resize(packet.marshal_size() + TAG_LEN, 0);
        let n = packet
            .marshal_to(&mut self.scratch)
            .map_err(|e| Error::Rtp(e.to_string()))?;
        match &mut self.sealer {
            Sealer::Gcm(gcm) => {
                let header_len = packet.header.marshal_size();
                gcm.seal(&mut self.scratch, n, &packet.header, header_len)
            }
            Sealer::Context(context) => {
                // With the header we have: `encrypt_rtp` would parse it
                // again, with an allocation per header extension.
                let sealed = context
                    .encrypt_rtp_with_header(&self.scratch[..n], &packet.header)
                    .map_err(|e| Error::Srtp(e.to_string()))?;
                self.scratch.clear();
                self.scratch.extend_from_slice(&sealed);
                Ok(sealed.len())
            }
        }
    }

    /// A sender report as of `now` (`wallclock` is the same moment as
    /// system time), or `None` before the first packet. Its RTP time is the
    /// last packet's, moved on by the time since it was sent, so that
    /// receivers can line up audio and video sent by different streams.
    pub fn sender_report(&self, now: Instant, wallclock: SystemTime) -> Option<SenderReport> {
        let (timestamp, at) = self.last?;
        let since = now.saturating_duration_since(at);
        let ticks = since.as_micros() * u128::from(self.clock_rate) / 1_000_000;
        Some(SenderReport {
            ssrc: self.ssrc,
            ntp_time: ntp(wallclock),
            rtp_time: timestamp.wrapping_add(ticks as u32),
            packet_count: self.packets,
            octet_count: self.octets,
            reports: vec![],
            profile_extensions: Bytes::new(),
        })
    }
}

/// `at` as a 64-bit NTP timestamp (seconds since 1900, 32.32 fixed point).
pub fn ntp(at: SystemTime) -> u64 {
    const UNIX_TO_NTP: u64 = 2_208_988_800;
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since.as_secs() + UNIX_TO_NTP;
    let fraction = (u64::from(since.subsec_nanos()) << 32) / 1_000_000_000;
    (seconds << 32) | fraction
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Gcm;

    fn stream(rtx: Option<Rtx>) -> OutStream {
        let crypto = rtc::crypto::default_provider().unwrap();
        let gcm = Gcm::new(crypto.crypto(), &[1; 16], &[2; 12]).unwrap();
        OutStream::new(10, 90000, Sealer::Gcm(gcm), rtx, 8)
    }

    fn packet(seq: u16) -> Packet {
        Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                payload_type: 96,
                sequence_number: seq,
                timestamp: 9000,
                ssrc: 10,
                ..Default::default()
            },
            payload: Bytes::from_static(b"abc"),
        }
    }

    #[test]
    fn only_a_kept_packet_of_a_stream_with_rtx_is_sent_again() {
        let start = Instant::now();
        let mut plain = stream(None);
        plain.send(packet(5), start).unwrap();
        assert!(plain.retransmit(5, start, |_| {}).is_none());

        let mut s = stream(Some(Rtx {
            ssrc: 11,
            payload_type: 97,
        }));
        for seq in 0..10 {
            s.send(packet(seq), start).unwrap();
        }
        // 8 kept: 0 and 1 were overwritten by 8 and 9.
        assert!(s.retransmit(1, start, |_| {}).is_none());
        assert!(s.retransmit(11, start, |_| {}).is_none());
        let again = s
            .retransmit(9, start, |p| p.header.marker = true)
            .unwrap()
            .unwrap();
        // Header (12) + OSN (2) + payload (3) + GCM tag (16).
        assert_eq!(again.len(), 12 + 2 + 3 + 16);
        assert_eq!(u32::from_be_bytes(again[8..12].try_into().unwrap()), 11);
        assert_eq!(again[1], 0x80 | 97);
        // Too late to be of use.
        assert!(
            s.retransmit(9, start + Duration::from_secs(2), |_| {})
                .is_none()
        );
    }

    #[test]
    fn a_sender_report_moves_the_last_rtp_time_on_by_the_time_since() {
        let start = Instant::now();
        let mut s = stream(None);
        let wallclock = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(s.sender_report(start, wallclock).is_none());
        s.send(packet(1), start).unwrap();
        s.send(packet(2), start).unwrap();
        let report = s
            .sender_report(start + Duration::from_millis(100), wallclock)
            .unwrap();
        assert_eq!(report.rtp_time, 9000 + 9000);
        assert_eq!((report.packet_count, report.octet_count), (2, 6));
        assert_eq!(report.ntp_time >> 32, 1_700_000_000 + 2_208_988_800);
        let half = ntp(wallclock + Duration::from_millis(500));
        assert_eq!(half & 0xffff_ffff, 1 << 31);
    }
}
