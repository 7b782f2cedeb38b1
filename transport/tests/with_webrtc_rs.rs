//! A [`Connection`] against webrtc-rs's own peer connection as the client,
//! in one process with no sockets: the client takes the server's offer,
//! answers, checks, shakes hands, receives RTP and sends RTCP. Every
//! datagram passes between the two as it would on the wire.

use bytes::{Bytes, BytesMut};
use confer_transport::sdp::{Codec, Kind, Media, Offer, Setup, parse_answer};
use confer_transport::{Certificate, Connection, Received};
use rtc::interceptor::Registry;
use rtc::peer_connection::RTCPeerConnectionBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCDtlsRole, RTCIceCandidate,
};
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtp::{header::Header, packet::Packet};
use rtc::sansio::Protocol;
use rtc::shared::marshal::Marshal;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SERVER: &str = "127.0.0.1:5000";
const CLIENT: &str = "127.0.0.1:6000";
const VIDEO_SSRC: u32 = 2222;
const AUDIO_SSRC: u32 = 1111;

fn sections() -> Vec<Media> {
    vec![
        Media {
            mid: "0".into(),
            kind: Kind::Audio,
            codecs: vec![Codec {
                payload_type: 111,
                name: "opus",
                clock_rate: 48000,
                channels: 2,
                fmtp: "minptime=10;useinbandfec=1",
                feedback: &["transport-cc"],
                rtx: None,
            }],
            extensions: vec![],
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
                fmtp: "",
                feedback: &["nack", "nack pli", "ccm fir", "transport-cc"],
                rtx: Some(97),
            }],
            extensions: vec![],
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
fn client(dtls_client: bool) -> rtc::peer_connection::RTCPeerConnection {
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
    let addr: SocketAddr = CLIENT.parse().unwrap();
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

fn rtp(ssrc: u32, payload_type: u8, seq: u16) -> BytesMut {
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
    .marshal()
    .unwrap()
}

#[test]
fn a_client_that_answers_active_connects_and_receives_what_the_server_sends() {
    connect_and_send(true);
}

#[test]
fn a_client_that_answers_passive_connects_and_receives_what_the_server_sends() {
    connect_and_send(false);
}

fn connect_and_send(dtls_client: bool) {
    let server_addr: SocketAddr = SERVER.parse().unwrap();
    let client_addr: SocketAddr = CLIENT.parse().unwrap();
    let start = Instant::now();
    let mut now = start;
    let mut server = Connection::new(Certificate::generate().unwrap());
    let media = sections();
    let offer = Offer {
        session: 1,
        version: 1,
        ufrag: server.ufrag(),
        pwd: server.pwd(),
        fingerprint: server.fingerprint(),
        candidate: server_addr,
        media: &media,
    }
    .to_sdp();

    let mut client = client(dtls_client);
    client
        .set_remote_description(now, RTCSessionDescription::offer(offer).unwrap())
        .unwrap();
    let answer = client.create_answer(None).unwrap();
    client.set_local_description(now, answer).unwrap();
    let answer = parse_answer(&client.local_description().unwrap().sdp).unwrap();
    let expected = if dtls_client {
        Setup::Active
    } else {
        Setup::Passive
    };
    assert_eq!(answer.setup, expected);
    assert_eq!(
        answer
            .media
            .iter()
            .map(|m| m.mid.as_str())
            .collect::<Vec<_>>(),
        ["0", "1"]
    );
    assert!(answer.media.iter().all(|m| m.accepted));
    server.apply_answer(now, &answer).unwrap();

    let mut connected_at = None;
    let mut seq = 0u16;
    let mut received: Vec<(u32, Bytes)> = Vec::new();
    let mut reports_for_video = 0;
    while now < start + Duration::from_secs(10) {
        while let Some(out) = client.poll_write() {
            assert_eq!(out.transport.peer_addr, server_addr);
            match server.handle(now, client_addr, &out.message).unwrap() {
                Received::Connected => connected_at = Some(now),
                Received::Rtcp(compound) => {
                    let packets = rtc::rtcp::packet::unmarshal(&mut compound.freeze()).unwrap();
                    for packet in packets {
                        if let Some(rr) = packet.as_any().downcast_ref::<ReceiverReport>() {
                            reports_for_video +=
                                rr.reports.iter().filter(|r| r.ssrc == VIDEO_SSRC).count();
                        }
                    }
                }
                Received::Rtp(_) | Received::Nothing => {}
            }
        }
        while let Some((to, datagram)) = server.poll_transmit() {
            assert_eq!(to, client_addr);
            deliver(&mut client, now, server_addr, client_addr, &datagram);
        }
        // From the tick after the handshake: webrtc-rs drops an SRTP packet
        // that arrives in the same pass as the Finished that completes it.
        if connected_at.is_some_and(|at| at < now) && seq == 50 {
            // Forged SRTP from the client's address is refused, and what
            // follows still gets through.
            for forged in [
                &[0x80u8, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9, 1, 2][..],
                &[0x80, 200, 0, 6, 0, 0, 0, 9, 1][..],
            ] {
                assert!(server.handle(now, client_addr, forged).is_err());
            }
        }
        if connected_at.is_some_and(|at| at < now) && seq < 100 {
            for (ssrc, pt) in [(VIDEO_SSRC, 96), (AUDIO_SSRC, 111)] {
                let (to, sealed) = server.protect_rtp(&rtp(ssrc, pt, seq)).unwrap().unwrap();
                assert_eq!(to, client_addr);
                deliver(&mut client, now, server_addr, client_addr, &sealed);
            }
            seq += 1;
        }
        while client.poll_event().is_some() {}
        while let Some(message) = client.poll_read() {
            if let RTCMessage::RtpPacket(_, packet) = message.message {
                received.push((packet.header.ssrc, packet.payload));
            }
        }
        now += Duration::from_millis(5);
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now).unwrap();
        }
        if server.poll_timeout().is_some_and(|t| t <= now) {
            server.handle_timeout(now).unwrap();
        }
    }

    let connected_at = connected_at.expect("the handshake completed");
    assert!(
        connected_at - start < Duration::from_secs(2),
        "connected after {:?}",
        connected_at - start
    );
    assert_eq!(server.remote(), Some(client_addr));
    for ssrc in [VIDEO_SSRC, AUDIO_SSRC] {
        let payloads: Vec<&Bytes> = received
            .iter()
            .filter(|(s, _)| *s == ssrc)
            .map(|(_, p)| p)
            .collect();
        let missing: Vec<u16> = (0..100)
            .filter(|n| !payloads.contains(&&Bytes::from(format!("frame {n}"))))
            .collect();
        assert_eq!(
            payloads.len(),
            100,
            "packets of {ssrc}, missing {missing:?}"
        );
        assert_eq!(payloads[42], &Bytes::from("frame 42"));
    }
    assert!(
        reports_for_video > 0,
        "the client's receiver reports reached the server"
    );
}

fn deliver(
    client: &mut rtc::peer_connection::RTCPeerConnection,
    now: Instant,
    from: SocketAddr,
    to: SocketAddr,
    datagram: &[u8],
) {
    client
        .handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: to,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(datagram),
        })
        .unwrap();
}
