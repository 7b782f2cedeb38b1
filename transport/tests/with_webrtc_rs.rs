//! A [`Connection`] against webrtc-rs's own peer connection as the client,
//! in one process with no sockets: the client takes the server's offer,
//! answers, checks, shakes hands, receives RTP and sends RTCP. Every
//! datagram passes between the two as it would on the wire.

use bytes::{Bytes, BytesMut};
use confer_transport::sdp::{Codec, Kind, Media, Offer, Setup, parse_answer};
use confer_transport::stream::ntp;
use confer_transport::{Certificate, Connection, Feedback, OutStream, Received, Rtx, feedback};
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCDtlsRole, RTCIceCandidate,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp::{header::Header, packet::Packet};
use rtc::sansio::Protocol;
use rtc::shared::marshal::Marshal;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

fn server_addr() -> SocketAddr {
    "127.0.0.1:5000".parse().unwrap()
}

fn client_addr() -> SocketAddr {
    "127.0.0.1:6000".parse().unwrap()
}
const VIDEO_SSRC: u32 = 2222;
const AUDIO_SSRC: u32 = 1111;

fn sections(extensions: Vec<(u8, &'static str)>) -> Vec<Media> {
    vec![
        Media {
            mid: "0".into(),
            kind: Kind::Audio,
            codecs: vec![Codec {
                payload_type: 111,
                name: "opus",
                clock_rate: 48000,
                channels: 2,
                fmtp: "minptime=10;useinbandfec=1".into(),
                feedback: &["transport-cc"],
                rtx: None,
            }],
            extensions: extensions.clone(),
            ssrc: AUDIO_SSRC,
            rtx_ssrc: None,
            stream: "alice".into(),
            track: "alice-audio".into(),
            sending: true,
        },
        Media {
            mid: "1".into(),
            kind: Kind::Video,
            codecs: vec![Codec {
                payload_type: 96,
                name: "VP8",
                clock_rate: 90000,
                channels: 0,
                fmtp: String::new(),
                feedback: &["nack", "nack pli", "ccm fir", "transport-cc"],
                rtx: Some(97),
            }],
            extensions: extensions.clone(),
            ssrc: VIDEO_SSRC,
            rtx_ssrc: Some(VIDEO_SSRC + 1),
            stream: "alice".into(),
            track: "alice-video".into(),
            sending: true,
        },
    ]
}

/// webrtc-rs answers an ICE-lite offer as the DTLS server (`passive`) by
/// default; browsers answer `active`. `dtls_client` makes it do the same.
fn client(dtls_client: bool) -> RTCPeerConnection {
    let mut settings = SettingEngineBuilder::new();
    if dtls_client {
        settings = settings.with_answering_dtls_role(RTCDtlsRole::Client);
    }
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs().unwrap();
    let registry = register_default_interceptors(Registry::new(), &mut media_engine).unwrap();
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_setting_engine(settings.build())
        .build(Instant::now())
        .unwrap();
    let addr: SocketAddr = client_addr();
    let candidate = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()
    .unwrap();
    pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json().unwrap())
        .unwrap();
    pc
}

fn rtp(ssrc: u32, payload_type: u8, seq: u16) -> Packet {
    Packet {
        header: Header {
            version: 2,
            payload_type,
            sequence_number: seq,
            timestamp: u32::from(seq) * 3000,
            ssrc,
            marker: true,
            ..Default::default()
        },
        payload: Bytes::from(format!("frame {seq}")),
    }
}

#[test]
fn a_client_that_answers_active_connects_and_receives_what_the_server_sends() {
    connect_and_send(true);
}

#[test]
fn a_client_that_answers_passive_connects_and_receives_what_the_server_sends() {
    connect_and_send(false);
}

/// The server and a webrtc-rs client, with every datagram passed between
/// them on a virtual clock that moves 5 ms a pass.
struct Pair {
    server: Connection,
    client: RTCPeerConnection,
    start: Instant,
    now: Instant,
    connected_at: Option<Instant>,
    /// RTP the client's application got.
    received: Vec<Packet>,
    /// What the client said back, read by the server.
    feedback: Vec<Feedback>,
}

impl Pair {
    fn new(dtls_client: bool, media: &[Media]) -> Pair {
        let start = Instant::now();
        let mut server = Connection::new(Certificate::generate().unwrap());
        let offer = Offer {
            session: 1,
            version: 1,
            ufrag: server.ufrag(),
            pwd: server.pwd(),
            fingerprint: server.fingerprint(),
            candidate: server_addr(),
            media,
        }
        .to_sdp();
        let mut client = client(dtls_client);
        client
            .set_remote_description(start, RTCSessionDescription::offer(offer).unwrap())
            .unwrap();
        let answer = client.create_answer(None).unwrap();
        client.set_local_description(start, answer).unwrap();
        let answer = parse_answer(&client.local_description().unwrap().sdp).unwrap();
        let expected = if dtls_client {
            Setup::Active
        } else {
            Setup::Passive
        };
        assert_eq!(answer.setup, expected);
        let mids: Vec<&str> = answer.media.iter().map(|m| m.mid.as_str()).collect();
        assert_eq!(mids, ["0", "1"]);
        assert!(answer.media.iter().all(|m| m.accepted));
        server.apply_answer(start, &answer).unwrap();
        Pair {
            server,
            client,
            start,
            now: start,
            connected_at: None,
            received: Vec::new(),
            feedback: Vec::new(),
        }
    }

    /// Wallclock on the virtual clock.
    fn wallclock(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + (self.now - self.start)
    }

    /// Media may flow: from the pass after the handshake, as webrtc-rs
    /// drops SRTP that arrives in the same pass as the Finished that
    /// completes it.
    fn flowing(&self) -> bool {
        self.connected_at.is_some_and(|at| at < self.now)
    }

    fn send_to_client(&mut self, datagram: &[u8]) {
        deliver(&mut self.client, self.now, datagram);
    }

    fn pass(&mut self) {
        let ntp_now = ntp(self.wallclock());
        while let Some(out) = self.client.poll_write() {
            assert_eq!(out.transport.peer_addr, server_addr());
            match self
                .server
                .handle(self.now, client_addr(), &out.message)
                .unwrap()
            {
                Received::Connected => self.connected_at = Some(self.now),
                Received::Rtcp(compound) => {
                    self.feedback
                        .extend(feedback::read(&compound, ntp_now).unwrap());
                }
                Received::Rtp(_) | Received::Nothing => {}
            }
        }
        while let Some((to, datagram)) = self.server.poll_transmit() {
            assert_eq!(to, client_addr());
            self.send_to_client(&datagram);
        }
        while self.client.poll_event().is_some() {}
        while let Some(message) = self.client.poll_read() {
            if let RTCMessage::RtpPacket(_, packet) = message.message {
                self.received.push(packet);
            }
        }
        self.now += Duration::from_millis(5);
        if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
            self.client.handle_timeout(self.now).unwrap();
        }
        if self.server.poll_timeout().is_some_and(|t| t <= self.now) {
            self.server.handle_timeout(self.now).unwrap();
        }
    }

    fn payloads(&self, ssrc: u32) -> Vec<Bytes> {
        self.received
            .iter()
            .filter(|p| p.header.ssrc == ssrc)
            .map(|p| p.payload.clone())
            .collect()
    }
}

fn connect_and_send(dtls_client: bool) {
    let mut pair = Pair::new(dtls_client, &sections(vec![]));
    let mut seq = 0u16;
    while pair.now < pair.start + Duration::from_secs(10) {
        pair.pass();
        if pair.flowing() && seq == 50 {
            // Forged SRTP from the client's address is refused, and what
            // follows still gets through.
            for forged in [
                &[0x80u8, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9, 1, 2][..],
                &[0x80, 200, 0, 6, 0, 0, 0, 9, 1][..],
            ] {
                assert!(pair.server.handle(pair.now, client_addr(), forged).is_err());
            }
        }
        if pair.flowing() && seq < 100 {
            for (ssrc, pt) in [(VIDEO_SSRC, 96), (AUDIO_SSRC, 111)] {
                let plain = rtp(ssrc, pt, seq).marshal().unwrap();
                let (to, sealed) = pair.server.protect_rtp(&plain).unwrap().unwrap();
                assert_eq!(to, client_addr());
                pair.send_to_client(&sealed);
            }
            seq += 1;
        }
    }
    let connected_at = pair.connected_at.expect("the handshake completed");
    assert!(
        connected_at - pair.start < Duration::from_secs(2),
        "connected after {:?}",
        connected_at - pair.start
    );
    assert_eq!(pair.server.remote(), Some(client_addr()));
    for ssrc in [VIDEO_SSRC, AUDIO_SSRC] {
        let payloads = pair.payloads(ssrc);
        let missing: Vec<u16> = (0..100)
            .filter(|n| !payloads.contains(&Bytes::from(format!("frame {n}"))))
            .collect();
        assert_eq!(
            payloads.len(),
            100,
            "packets of {ssrc}, missing {missing:?}"
        );
        assert_eq!(payloads[42], Bytes::from("frame 42"));
    }
    let reports = pair.feedback.iter().filter(|f| {
        matches!(
            f,
            Feedback::Report {
                ssrc: VIDEO_SSRC,
                ..
            }
        )
    });
    assert!(
        reports.count() > 0,
        "the client's receiver reports reached the server"
    );
}

/// Streams of the server's own ([`OutStream`]): a lost packet is asked for
/// and comes again on the RTX stream, sender reports give round trips, and
/// transport-wide sequence numbers bring congestion feedback.
#[test]
fn lost_packets_come_again_reports_and_congestion_feedback_flow() {
    let mut pair = Pair::new(true, &sections(vec![(TWCC_ID, TWCC_URI)]));
    let mut streams: Option<(OutStream, OutStream)> = None;
    let mut twcc = 0u16;
    let mut next_report = pair.start;
    let mut seq = 0u16;
    let mut lost_once = false;
    let mut retransmitted = 0;
    let mut nacked = std::collections::BTreeSet::new();
    while pair.now < pair.start + Duration::from_secs(10) {
        pair.pass();
        if !pair.flowing() {
            continue;
        }
        let (video, audio) = streams.get_or_insert_with(|| {
            let rtx = Some(Rtx {
                ssrc: VIDEO_SSRC + 1,
                payload_type: 97,
            });
            let video = pair
                .server
                .out_stream(VIDEO_SSRC, 90000, rtx, 128)
                .unwrap()
                .unwrap();
            let audio = pair
                .server
                .out_stream(AUDIO_SSRC, 48000, None, 128)
                .unwrap()
                .unwrap();
            (video, audio)
        });
        for feedback in std::mem::take(&mut pair.feedback) {
            match feedback {
                Feedback::Nack { ssrc, sequences } => {
                    assert_eq!(ssrc, VIDEO_SSRC);
                    for sequence in sequences {
                        nacked.insert(sequence);
                        let again = video.retransmit(sequence, pair.now, |p| stamp(p, &mut twcc));
                        if let Some(sealed) = again {
                            deliver(&mut pair.client, pair.now, sealed.unwrap());
                            retransmitted += 1;
                        }
                    }
                }
                other => pair.feedback.push(other),
            }
        }
        if seq < 200 {
            for (stream, pt) in [(&mut *video, 96), (&mut *audio, 111)] {
                let ssrc = stream.ssrc();
                let mut packet = rtp(ssrc, pt, seq);
                stamp(&mut packet, &mut twcc);
                let sealed = stream.send(packet, pair.now).unwrap();
                // The 30th video packet is lost on the way, once.
                if ssrc == VIDEO_SSRC && seq == 30 && !lost_once {
                    lost_once = true;
                    continue;
                }
                deliver(&mut pair.client, pair.now, sealed);
            }
            seq += 1;
        }
        if pair.now >= next_report {
            next_report += Duration::from_secs(1);
            let reports: Vec<Box<dyn rtc::rtcp::packet::Packet>> = [&*video, &*audio]
                .iter()
                .filter_map(|s| s.sender_report(pair.now, pair.wallclock()))
                .map(|r| Box::new(r) as Box<dyn rtc::rtcp::packet::Packet>)
                .collect();
            if !reports.is_empty() {
                let compound = rtc::rtcp::packet::marshal(&reports).unwrap();
                let (_, sealed) = pair.server.protect_rtcp(&compound).unwrap().unwrap();
                deliver(&mut pair.client, pair.now, &sealed);
            }
        }
    }
    // Only the lost packet was asked for (webrtc-rs asks a few times: its
    // NACK generator does not see the repair, which happens after it).
    assert_eq!(nacked.into_iter().collect::<Vec<_>>(), [30]);
    assert!(retransmitted >= 1);
    // webrtc-rs takes the RTX packet apart and hands the application the
    // original.
    let video = pair.payloads(VIDEO_SSRC);
    assert!(
        video.contains(&Bytes::from("frame 30")),
        "frame 30 came again"
    );
    let distinct: std::collections::HashSet<&Bytes> = video.iter().collect();
    assert_eq!(distinct.len(), 200);
    let rtts: Vec<Duration> = pair
        .feedback
        .iter()
        .filter_map(|f| match f {
            Feedback::Report {
                ssrc: VIDEO_SSRC,
                rtt: Some(rtt),
                ..
            } => Some(*rtt),
            _ => None,
        })
        .collect();
    assert!(
        !rtts.is_empty(),
        "receiver reports answered our sender reports"
    );
    // Each report is answered within a pass or two of the virtual clock.
    assert!(
        rtts.iter().all(|rtt| *rtt <= Duration::from_millis(50)),
        "{rtts:?}"
    );
    let congestion = pair
        .feedback
        .iter()
        .filter(|f| matches!(f, Feedback::Congestion(_)))
        .count();
    assert!(congestion > 0, "transport-wide congestion feedback arrived");
}

const TWCC_ID: u8 = 3;
const TWCC_URI: &str = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// Gives `packet` the next transport-wide sequence number.
fn stamp(packet: &mut Packet, twcc: &mut u16) {
    packet
        .header
        .set_extension(TWCC_ID, Bytes::copy_from_slice(&twcc.to_be_bytes()))
        .unwrap();
    *twcc = twcc.wrapping_add(1);
}

fn deliver(client: &mut RTCPeerConnection, now: Instant, datagram: &[u8]) {
    client
        .handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: client_addr(),
                peer_addr: server_addr(),
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(datagram),
        })
        .unwrap();
}
