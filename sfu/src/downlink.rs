//! A participant's downlink of our own: what it receives, sent without the
//! webrtc crate's pipeline (`confer-transport`).
//!
//! A client that asks for it at join (`"downlink": true`) has two
//! connections: the webrtc peer connection it publishes on, and this one,
//! which the SFU offers and the client answers (`downlink_offer`,
//! `downlink_answer`). A forwarded packet is rewritten for the receiver,
//! stamped with the downlink's transport-wide sequence number, protected by
//! the receiver's own SRTP context and handed to the shared socket's outbox,
//! all in the publisher's forwarding task: no channel, no other task, and
//! no lock shared between the tracks a participant receives but the send
//! history that congestion feedback is read against.
//!
//! What the client says back (its RTCP) is handled as it arrives, in the
//! shared socket's reader: NACKs are answered from the receiver's RTX
//! history, keyframe requests go to the publisher, reception reports to the
//! loss ceiling, congestion feedback to the bandwidth estimate.

use crate::bandwidth::{Estimate, Reporting};
use crate::mux::{Attachment, Destination, Routed};
use crate::sent::SendHistory;
use crate::track::Receiver;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use confer_transport::sdp::{self, Codec, Kind, Media, Offer};
use confer_transport::stream::ntp;
use confer_transport::{Certificate, Connection, Feedback, OutStream, Received};
use rtc::interceptor::{BandwidthEstimator, convert_twcc};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use tracing::{debug, trace};

/// Header extension ids in every downlink offer.
pub(crate) const AUDIO_LEVEL_ID: u8 = 1;
pub(crate) const TWCC_ID: u8 = 3;

/// Every 16-bit sequence number, big-endian: a packet's transport-wide
/// number is a static slice of this (128 KiB) rather than an allocation.
static SEQUENCES: [[u8; 2]; 1 << 16] = {
    let mut all = [[0; 2]; 1 << 16];
    let mut n = 0;
    while n < all.len() {
        all[n] = (n as u16).to_be_bytes();
        n += 1;
    }
    all
};
pub(crate) const TWCC_URI: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// Packets kept per video stream for retransmission (see `peer::NACK_BUFFER`).
const KEEP: usize = 128;
/// Sender reports, per stream, this often.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// RTCP compound packets stay under a path MTU: 28-byte reports, 40 at most.
const REPORTS_PER_PACKET: usize = 40;

pub(crate) struct Downlink {
    attachment: Attachment,
    conn: Mutex<Connection>,
    /// Where media goes, once the client has checked a pair.
    to: ArcSwapOption<SocketAddr>,
    connected: watch::Sender<bool>,
    /// The next transport-wide sequence number (its low 16 bits go out).
    twcc: AtomicU64,
    congestion: Mutex<Congestion>,
    /// Receivers by the SSRCs they send on (media and RTX), for feedback.
    streams: Mutex<HashMap<u32, Weak<Receiver>>>,
    /// Offers: the `o=` session id, and the sections offered so far.
    session: u64,
}

struct Congestion {
    history: SendHistory,
    estimator: Reporting,
}

impl Downlink {
    /// A downlink on the shared socket; `estimate` is the participant's,
    /// which the room's bandwidth allocation reads.
    pub(crate) fn new(
        attachment: Attachment,
        certificate: Certificate,
        estimate: Option<Estimate>,
    ) -> Arc<Downlink> {
        let conn = Connection::with_credentials(
            certificate,
            attachment.ufrag.clone(),
            attachment.pwd.clone(),
        );
        let link = Arc::new(Downlink {
            attachment,
            conn: Mutex::new(conn),
            to: ArcSwapOption::empty(),
            connected: watch::Sender::new(false),
            twcc: AtomicU64::new(0),
            congestion: Mutex::new(Congestion {
                history: SendHistory::new(Instant::now()),
                // Without estimation the estimate stays unset: no limit.
                estimator: Reporting::new(estimate.unwrap_or_default()),
            }),
            streams: Mutex::new(HashMap::new()),
            session: rand::random::<u32>().into(),
        });
        tokio::spawn(report_loop(Arc::downgrade(&link)));
        link
    }

    /// The offer of `sections`, numbered `version`.
    pub(crate) fn offer(&self, version: u64, sections: &[Media]) -> String {
        let conn = self.conn.lock().unwrap();
        Offer {
            session: self.session,
            version,
            ufrag: conn.ufrag(),
            pwd: conn.pwd(),
            fingerprint: conn.fingerprint(),
            candidate: self.attachment.local_addr(),
            media: sections,
        }
        .to_sdp()
    }

    /// The client's answer: starts the handshake on the first.
    pub(crate) fn answer(&self, answer: &sdp::Answer) -> Result<(), confer_transport::Error> {
        let mut conn = self.conn.lock().unwrap();
        let result = conn.apply_answer(Instant::now(), answer);
        self.flush(&mut conn);
        result
    }

    /// Waits until SRTP keys are in place; false if the downlink is gone.
    pub(crate) async fn connected(&self) -> bool {
        let mut rx = self.connected.subscribe();
        rx.wait_for(|c| *c).await.is_ok()
    }

    /// A stream for a receiver, once connected; it is told the client's
    /// feedback on its SSRCs from now on.
    pub(crate) fn out_stream(
        &self,
        receiver: &Arc<Receiver>,
        ssrc: u32,
        clock_rate: u32,
        rtx: Option<confer_transport::Rtx>,
    ) -> Option<OutStream> {
        let stream = match self
            .conn
            .lock()
            .unwrap()
            .out_stream(ssrc, clock_rate, rtx, KEEP)?
        {
            Ok(stream) => stream,
            Err(e) => {
                debug!("downlink stream not made: {e}");
                return None;
            }
        };
        let mut streams = self.streams.lock().unwrap();
        streams.insert(ssrc, Arc::downgrade(receiver));
        if let Some(rtx) = rtx {
            streams.insert(rtx.ssrc, Arc::downgrade(receiver));
        }
        Some(stream)
    }

    /// Forgets a receiver's SSRCs.
    pub(crate) fn forget(&self, ssrcs: &[u32]) {
        let mut streams = self.streams.lock().unwrap();
        for ssrc in ssrcs {
            streams.remove(ssrc);
        }
    }

    /// Stamps `packet` with the next transport-wide sequence number, sends
    /// it on `stream`, and records it for congestion feedback.
    pub(crate) fn send(&self, stream: &mut OutStream, mut packet: rtp::Packet, now: Instant) {
        let Some(to) = self.to.load_full() else {
            return;
        };
        let twcc = self.stamp(&mut packet);
        let (ssrc, sequence) = (packet.header.ssrc, packet.header.sequence_number);
        match stream.send(packet, now) {
            Ok(sealed) => {
                self.record(twcc, ssrc, sequence, sealed.len(), now);
                self.attachment.send(*to, sealed);
            }
            Err(e) => trace!("not protected: {e}"),
        }
    }

    /// Gives `packet` the next transport-wide sequence number.
    fn stamp(&self, packet: &mut rtp::Packet) -> u64 {
        let twcc = self.twcc.fetch_add(1, Ordering::Relaxed);
        let value = Bytes::from_static(&SEQUENCES[twcc as u16 as usize]);
        let _ = packet.header.set_extension(TWCC_ID, value);
        twcc
    }

    fn record(&self, twcc: u64, ssrc: u32, sequence: u16, size: usize, now: Instant) {
        let mut congestion = self.congestion.lock().unwrap();
        congestion.history.record(twcc, ssrc, sequence, size, now);
    }

    /// Sends what the connection queued (check answers, handshake records)
    /// and notes where media goes now.
    fn flush(&self, conn: &mut Connection) {
        while let Some((to, datagram)) = conn.poll_transmit() {
            self.attachment.send(to, &datagram);
        }
        if let Some(remote) = conn.remote()
            && self.to.load().as_deref() != Some(&remote)
        {
            self.to.store(Some(Arc::new(remote)));
        }
    }

    fn feedback(&self, compound: &[u8], now: Instant) {
        let said = match confer_transport::feedback::read(compound, ntp(SystemTime::now())) {
            Ok(said) => said,
            Err(e) => {
                debug!("downlink RTCP not read: {e}");
                return;
            }
        };
        for feedback in said {
            match feedback {
                Feedback::Nack { ssrc, sequences } => {
                    if let Some(r) = self.receiver(ssrc) {
                        for sequence in sequences {
                            r.retransmit(self, sequence, now);
                        }
                    }
                }
                Feedback::KeyframeRequest { ssrc } => {
                    if let Some(r) = self.receiver(ssrc) {
                        r.keyframe_requested();
                    }
                }
                Feedback::Report {
                    ssrc,
                    fraction_lost,
                    ..
                } => {
                    if let Some(r) = self.receiver(ssrc) {
                        r.reported(fraction_lost, now);
                    }
                }
                Feedback::Congestion(cc) => {
                    let mut congestion = self.congestion.lock().unwrap();
                    for ack in convert_twcc(&cc) {
                        congestion.history.acknowledge(&ack);
                    }
                    let reports = congestion.history.take_reports();
                    congestion.estimator.on_reports(now, &reports);
                }
                Feedback::Estimate { .. } => {}
            }
        }
    }

    fn receiver(&self, ssrc: u32) -> Option<Arc<Receiver>> {
        self.streams.lock().unwrap().get(&ssrc)?.upgrade()
    }

    /// Sends the RTX packet for `sequence` of `stream`, if it is kept.
    pub(crate) fn retransmit(&self, stream: &mut OutStream, sequence: u16, now: Instant) {
        let Some(to) = self.to.load_full() else {
            return;
        };
        let mut stamped = None;
        let sent = stream.retransmit(sequence, now, |p| {
            stamped = Some((self.stamp(p), p.header.ssrc, p.header.sequence_number));
        });
        if let (Some(Ok(sealed)), Some((twcc, ssrc, seq))) = (sent, stamped) {
            self.record(twcc, ssrc, seq, sealed.len(), now);
            self.attachment.send(*to, sealed);
        }
    }

    /// Sender reports for every stream, and the handshake's retransmissions.
    fn tick(&self, now: Instant, wallclock: SystemTime) {
        let receivers: Vec<Arc<Receiver>> = {
            let streams = self.streams.lock().unwrap();
            let mut seen: Vec<Arc<Receiver>> = Vec::new();
            for r in streams.values().filter_map(Weak::upgrade) {
                if !seen.iter().any(|s| Arc::ptr_eq(s, &r)) {
                    seen.push(r);
                }
            }
            seen
        };
        let reports: Vec<Box<dyn rtc::rtcp::Packet>> = receivers
            .iter()
            .filter_map(|r| r.sender_report(now, wallclock))
            .map(|r| Box::new(r) as Box<dyn rtc::rtcp::Packet>)
            .collect();
        let mut conn = self.conn.lock().unwrap();
        if conn.poll_timeout().is_some_and(|t| t <= now)
            && let Err(e) = conn.handle_timeout(now)
        {
            debug!("downlink handshake: {e}");
        }
        for chunk in reports.chunks(REPORTS_PER_PACKET) {
            let Ok(compound) = rtc::rtcp::packet::marshal(chunk) else {
                continue;
            };
            if let Ok(Some((to, sealed))) = conn.protect_rtcp(&compound) {
                self.attachment.send(to, &sealed);
            }
        }
        self.flush(&mut conn);
    }
}

impl Destination for Downlink {
    fn pwd(&self) -> &str {
        &self.attachment.pwd
    }

    /// Handled here, in the shared socket's reader: checks, the handshake
    /// and the client's RTCP are all small, and no task is woken for them.
    fn deliver(&self, from: SocketAddr, datagram: Bytes) -> Routed {
        let now = Instant::now();
        let mut conn = self.conn.lock().unwrap();
        let result = conn.handle(now, from, &datagram);
        self.flush(&mut conn);
        drop(conn);
        match result {
            Ok(Received::Connected) => {
                debug!("downlink connected");
                self.connected.send_replace(true);
            }
            Ok(Received::Rtcp(compound)) => self.feedback(&compound, now),
            Ok(Received::Rtp(_) | Received::Nothing) => {}
            Err(e) => debug!(%from, "downlink datagram refused: {e}"),
        }
        Routed::Delivered
    }
}

/// Until the downlink is gone: sender reports every [`REPORT_EVERY`], and
/// the handshake's timers more often until it is connected.
async fn report_loop(link: Weak<Downlink>) {
    let mut reported = Instant::now();
    loop {
        let Some(l) = link.upgrade() else { return };
        let connected = *l.connected.borrow();
        let now = Instant::now();
        if !connected || now >= reported + REPORT_EVERY {
            if connected {
                reported = now;
            }
            l.tick(now, SystemTime::now());
        }
        drop(l);
        let wait = if connected {
            REPORT_EVERY
        } else {
            Duration::from_millis(50)
        };
        tokio::time::sleep(wait).await;
    }
}

/// The section that sends `codec` to the client on `ssrc` (and RTX on
/// `rtx_ssrc` for video), with the payload types the downlink always
/// offers; `None` for a codec it does not forward.
pub(crate) fn section(
    mid: String,
    codec: &RTCRtpCodec,
    ssrc: u32,
    rtx_ssrc: u32,
    stream: &str,
    track: &str,
) -> Option<Media> {
    let mime = codec.mime_type.to_ascii_lowercase();
    let video_feedback: &'static [&'static str] = &["nack", "nack pli", "ccm fir", "transport-cc"];
    let (kind, payload_type, name, rtx, feedback): (
        Kind,
        u8,
        &'static str,
        Option<u8>,
        &'static [&str],
    ) = match mime.as_str() {
        "audio/opus" => (Kind::Audio, 111, "opus", None, &["transport-cc"]),
        "video/vp8" => (Kind::Video, 96, "VP8", Some(97), video_feedback),
        "video/vp9" => (Kind::Video, 98, "VP9", Some(99), video_feedback),
        "video/h264" => (Kind::Video, 102, "H264", Some(103), video_feedback),
        _ => return None,
    };
    let mut extensions = vec![(TWCC_ID, TWCC_URI)];
    if kind == Kind::Audio {
        extensions.push((AUDIO_LEVEL_ID, crate::forward::AUDIO_LEVEL_URI));
    }
    Some(Media {
        mid,
        kind,
        codecs: vec![Codec {
            payload_type,
            name,
            clock_rate: codec.clock_rate,
            channels: codec.channels as u8,
            // The publisher's parameters, so the receiver decodes what it gets.
            fmtp: codec.sdp_fmtp_line.clone(),
            feedback,
            rtx,
        }],
        extensions,
        ssrc,
        rtx_ssrc: rtx.map(|_| rtx_ssrc),
        stream: stream.to_owned(),
        track: track.to_owned(),
        sending: true,
    })
}
