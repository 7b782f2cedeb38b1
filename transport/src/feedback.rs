//! What a client tells the server about the streams it receives (RTCP):
//! read from a decrypted compound packet into plain values.

use rtc::rtcp::packet::Packet;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use std::time::Duration;

use crate::Error;

/// One thing a client said.
#[derive(Debug)]
pub enum Feedback {
    /// These packets of `ssrc` did not arrive.
    Nack { ssrc: u32, sequences: Vec<u16> },
    /// `ssrc` cannot be decoded until its next keyframe (PLI or FIR).
    KeyframeRequest { ssrc: u32 },
    /// A reception report about `ssrc`.
    Report {
        ssrc: u32,
        /// Lost since the last report, in 1/256.
        fraction_lost: u8,
        /// Interarrival jitter, in RTP time units.
        jitter: u32,
        /// Round trip, when the report answers one of our sender reports.
        rtt: Option<Duration>,
    },
    /// Transport-wide congestion feedback: when each packet arrived.
    Congestion(TransportLayerCc),
    /// The client's own estimate of what it can receive (REMB).
    Estimate { bits_per_second: f32 },
}

/// Reads a compound packet. `ntp_now` (the current NTP time) turns the
/// report blocks' timestamps into round trips.
pub fn read(compound: &[u8], ntp_now: u64) -> Result<Vec<Feedback>, Error> {
    let mut buf = compound;
    let packets = rtc::rtcp::packet::unmarshal(&mut buf).map_err(|e| Error::Rtcp(e.to_string()))?;
    let mut out = Vec::new();
    for packet in &packets {
        read_one(packet.as_ref(), ntp_now, &mut out);
    }
    Ok(out)
}

fn read_one(packet: &dyn Packet, ntp_now: u64, out: &mut Vec<Feedback>) {
    let any = packet.as_any();
    if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
        out.extend(rr.reports.iter().map(|b| report(b, ntp_now)));
    } else if let Some(sr) = any.downcast_ref::<rtc::rtcp::sender_report::SenderReport>() {
        out.extend(sr.reports.iter().map(|b| report(b, ntp_now)));
    } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
        out.push(Feedback::Nack {
            ssrc: nack.media_ssrc,
            sequences: nack
                .nacks
                .iter()
                .flat_map(|pair| pair.packet_list())
                .collect(),
        });
    } else if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
        out.push(Feedback::KeyframeRequest {
            ssrc: pli.media_ssrc,
        });
    } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
        out.extend(
            fir.fir
                .iter()
                .map(|e| Feedback::KeyframeRequest { ssrc: e.ssrc }),
        );
    } else if let Some(cc) = any.downcast_ref::<TransportLayerCc>() {
        out.push(Feedback::Congestion(cc.clone()));
    } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
        out.push(Feedback::Estimate {
            bits_per_second: remb.bitrate,
        });
    }
}

fn report(block: &ReceptionReport, ntp_now: u64) -> Feedback {
    // RFC 3550 §6.4.1: round trip = now − LSR − DLSR, in the middle 32 bits
    // of NTP time (1/65536 s).
    let rtt = (block.last_sender_report != 0).then(|| {
        let now = (ntp_now >> 16) as u32;
        let units = now
            .wrapping_sub(block.last_sender_report)
            .wrapping_sub(block.delay);
        Duration::from_micros(u64::from(units) * 1_000_000 / 65_536)
    });
    Feedback::Report {
        ssrc: block.ssrc,
        fraction_lost: block.fraction_lost,
        jitter: block.jitter,
        // A round trip past a minute is a wrapped subtraction, not a link.
        rtt: rtt.filter(|d| *d < Duration::from_secs(60)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::payload_feedbacks::full_intra_request::FirEntry;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;

    fn compound(packets: Vec<Box<dyn Packet>>) -> Vec<u8> {
        rtc::rtcp::packet::marshal(&packets).unwrap().to_vec()
    }

    #[test]
    fn each_kind_of_feedback_is_read() {
        let now = 0x0001_2345_6789_0000u64;
        // The report answers a sender report sent 100 ms before `now`,
        // held 20 ms by the client: 80 ms of round trip.
        let lsr = ((now >> 16) as u32).wrapping_sub(6554);
        let bytes = compound(vec![
            Box::new(ReceiverReport {
                ssrc: 1,
                reports: vec![ReceptionReport {
                    ssrc: 10,
                    fraction_lost: 64,
                    jitter: 90,
                    last_sender_report: lsr,
                    delay: 1311,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            Box::new(TransportLayerNack {
                sender_ssrc: 1,
                media_ssrc: 10,
                nacks: vec![NackPair {
                    packet_id: 100,
                    lost_packets: 0b101,
                }],
            }),
            Box::new(PictureLossIndication {
                sender_ssrc: 1,
                media_ssrc: 10,
            }),
            Box::new(FullIntraRequest {
                sender_ssrc: 1,
                media_ssrc: 0,
                fir: vec![FirEntry {
                    ssrc: 20,
                    sequence_number: 1,
                }],
            }),
            Box::new(ReceiverEstimatedMaximumBitrate {
                sender_ssrc: 1,
                bitrate: 1_500_000.0,
                ssrcs: vec![10],
            }),
        ]);
        let feedback = read(&bytes, now).unwrap();
        assert_eq!(feedback.len(), 5, "{feedback:?}");
        let Feedback::Report {
            ssrc: 10,
            fraction_lost: 64,
            jitter: 90,
            rtt: Some(rtt),
        } = feedback[0]
        else {
            panic!("{:?}", feedback[0]);
        };
        assert!(
            rtt.abs_diff(Duration::from_millis(80)) < Duration::from_millis(1),
            "{rtt:?}"
        );
        assert!(
            matches!(&feedback[1], Feedback::Nack { ssrc: 10, sequences } if sequences == &[100, 101, 103])
        );
        assert!(matches!(
            feedback[2],
            Feedback::KeyframeRequest { ssrc: 10 }
        ));
        assert!(matches!(
            feedback[3],
            Feedback::KeyframeRequest { ssrc: 20 }
        ));
        assert!(
            matches!(feedback[4], Feedback::Estimate { bits_per_second } if bits_per_second == 1_500_000.0)
        );
    }

    #[test]
    fn a_report_without_a_sender_report_has_no_round_trip_and_garbage_is_refused() {
        let bytes = compound(vec![Box::new(ReceiverReport {
            ssrc: 1,
            reports: vec![ReceptionReport {
                ssrc: 10,
                ..Default::default()
            }],
            ..Default::default()
        })]);
        assert!(matches!(
            read(&bytes, 1 << 40).unwrap()[0],
            Feedback::Report { rtt: None, .. }
        ));
        assert!(read(&[0x80, 201, 0, 9, 1, 2], 0).is_err());
        assert!(read(&bytes[..bytes.len() - 1], 0).is_err());
    }
}
