//! What a participant on a downlink publishes, received on a connection of
//! our own (`confer-transport`) instead of a webrtc peer connection.
//!
//! The client offers its publishing connection as before; the SFU answers
//! as ICE-lite and DTLS server, taking each section it sends with one codec
//! ([`confer_transport::publish`]). Every datagram is handled as it arrives,
//! in the shared socket's reader: decrypted, its stream found (by SSRC, or
//! by the mid and rid header extensions the first packets carry), RTX
//! unwrapped, duplicates dropped, and handed to its track's forwarding task
//! through a channel. A timer asks for what went missing (NACK), tells the
//! client when each packet arrived (transport-wide congestion feedback, on
//! which its bitrate and simulcast layers rest) and sends reception reports.

use crate::mux::{Attachment, Destination, Routed};
use crate::track::Incoming;
use bytes::{Buf, Bytes};
use confer_transport::arrivals::Arrivals;
use confer_transport::publish::{self, Answered, PublishAnswer, Taken};
use confer_transport::receive::{Arrival, InStream};
use confer_transport::sdp::Kind;
use confer_transport::{Certificate, Connection, Received};
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
use rtc::rtp;
use rtc::shared::marshal::Unmarshal;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, trace};

const MID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:mid";
const RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";
const REPAIRED_RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id";

/// Codecs taken from a publisher, in the order they are preferred when
/// several are offered (the first offered of them is taken).
const CODECS: &[&str] = &["opus", "VP8", "VP9", "H264"];
/// Packets waiting for a track's forwarding task; more are dropped (and
/// asked for again, for video).
const QUEUE: usize = 1024;
/// Timers: NACKs this often, congestion feedback every second tick,
/// reception reports every second.
const TICK: Duration = Duration::from_millis(50);
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A connection not up this long after the answer has failed.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

/// A track of this uplink, for the room to publish.
pub(crate) struct NewTrack {
    pub kind: Kind,
    pub codec: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec,
    /// The client's track id (`a=msid`), else the mid.
    pub track_id: String,
    pub first_ssrc: u32,
    /// Header extensions of its section, `(uri, id)`.
    pub extensions: Vec<(String, u16)>,
    pub packets: mpsc::Receiver<Incoming>,
}

/// What the uplink tells its participant.
pub(crate) enum UplinkEvent {
    Track(NewTrack),
    Connected,
    /// Not connected in time, or silent too long after.
    Lost(&'static str),
}

pub(crate) struct Uplink {
    attachment: Attachment,
    conn: Mutex<Connection>,
    state: Mutex<State>,
    connected: watch::Sender<bool>,
    events: mpsc::UnboundedSender<UplinkEvent>,
    session: u64,
    /// Our SSRC in the feedback we send.
    ssrc: u32,
}

#[derive(Default)]
struct State {
    version: u64,
    sections: Vec<Section>,
    /// Media SSRCs to their section and rid; RTX SSRCs to the media SSRC
    /// they repair.
    routes: HashMap<u32, Route>,
    streams: HashMap<u32, InStream>,
    /// The rid of each simulcast stream, as its first packet named it.
    rids: HashMap<u32, String>,
    arrivals: Option<Arrivals>,
    /// Header extension ids (shared by every bundled section).
    mid_id: u8,
    rid_id: u8,
    repaired_id: u8,
    twcc_id: u8,
    answered_at: Option<Instant>,
    last_heard: Option<Instant>,
    /// The media SSRC a feedback names (any of the client's).
    some_ssrc: u32,
}

struct Section {
    taken: Taken,
    track_id: String,
    /// SSRCs the offer announced, with their RTX SSRCs.
    announced: Vec<(u32, Option<u32>)>,
    /// To its track's forwarding task, once its first packet came; `None`
    /// again when the client stops sending it.
    packets: Option<mpsc::Sender<Incoming>>,
    /// Whether it still sends (it may stop in a later offer).
    active: bool,
}

#[derive(Clone, Copy)]
enum Route {
    Media { section: usize },
    Rtx { media: u32 },
}

impl Uplink {
    pub(crate) fn new(
        attachment: Attachment,
        certificate: Certificate,
        events: mpsc::UnboundedSender<UplinkEvent>,
        disconnect_timeout: Duration,
    ) -> Arc<Uplink> {
        let conn = Connection::with_credentials(
            certificate,
            attachment.ufrag.clone(),
            attachment.pwd.clone(),
        );
        let link = Arc::new(Uplink {
            attachment,
            conn: Mutex::new(conn),
            state: Mutex::new(State::default()),
            connected: watch::Sender::new(false),
            events,
            session: rand::random::<u32>().into(),
            ssrc: rand::random(),
        });
        tokio::spawn(timer_loop(Arc::downgrade(&link), disconnect_timeout));
        link
    }

    pub(crate) fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Answers the client's offer: takes what it sends, ends the tracks of
    /// sections it no longer sends, and starts the handshake on the first.
    pub(crate) fn answer(&self, sdp: &str) -> Result<String, confer_transport::Error> {
        let offer = publish::parse_offer(sdp)?;
        let now = Instant::now();
        let mut conn = self.conn.lock().unwrap();
        let mut state = self.state.lock().unwrap();
        // Sections keep their place: an offer may only add to them.
        for (i, old) in state.sections.iter().enumerate() {
            if offer.media.get(i).map(|m| m.mid.as_str()) != Some(old.taken.mid.as_str()) {
                return Err(confer_transport::Error::Sdp(format!(
                    "section {i} was mid {:?} and is missing or moved",
                    old.taken.mid
                )));
            }
        }
        let answered: Vec<Answered> = offer
            .media
            .iter()
            .map(|m| publish::take(m, CODECS, accept_codec))
            .collect();
        conn.apply_offer(now, &offer)?;
        for (i, (a, offered)) in answered.iter().zip(&offer.media).enumerate() {
            let section = |t: &Taken| Section {
                taken: t.clone(),
                track_id: offered
                    .msid
                    .as_ref()
                    .map_or_else(|| t.mid.clone(), |(_, track)| track.clone()),
                announced: offered.ssrcs.clone(),
                packets: None,
                active: t.receiving,
            };
            match (a, state.sections.get_mut(i)) {
                (Answered::Taken(t), None) => state.sections.push(section(t)),
                // It starts sending (again): a new track.
                (Answered::Taken(t), Some(s)) if t.receiving && !s.active => *s = section(t),
                (Answered::Refused { mid, media, .. }, None) => {
                    // A placeholder that never carries media.
                    state.sections.push(Section {
                        taken: Taken {
                            mid: mid.clone(),
                            kind: if media == "audio" {
                                Kind::Audio
                            } else {
                                Kind::Video
                            },
                            codec: publish::OfferedCodec::default(),
                            extensions: Vec::new(),
                            recvonly_extensions: Vec::new(),
                            rids: Vec::new(),
                            feedback: Vec::new(),
                            receiving: false,
                        },
                        track_id: String::new(),
                        announced: Vec::new(),
                        packets: None,
                        active: false,
                    });
                }
                (Answered::Refused { .. }, Some(s))
                | (
                    Answered::Taken(Taken {
                        receiving: false, ..
                    }),
                    Some(s),
                ) => {
                    if s.active {
                        debug!(mid = %s.taken.mid, "the client stopped sending a section");
                    }
                    // Its track ends once its queue is read.
                    s.active = false;
                    s.packets = None;
                }
                (Answered::Taken(_), Some(_)) => {}
            }
        }
        let state = &mut *state;
        for (i, s) in state.sections.iter().enumerate() {
            if !s.active {
                continue;
            }
            for (id, uri) in &s.taken.extensions {
                let slot = match uri.as_str() {
                    MID_URI => &mut state.mid_id,
                    RID_URI => &mut state.rid_id,
                    REPAIRED_RID_URI => &mut state.repaired_id,
                    crate::downlink::TWCC_URI => &mut state.twcc_id,
                    _ => continue,
                };
                *slot = *id;
            }
            for &(ssrc, rtx) in &s.announced {
                state
                    .routes
                    .entry(ssrc)
                    .or_insert(Route::Media { section: i });
                if let Some(rtx) = rtx {
                    state
                        .routes
                        .entry(rtx)
                        .or_insert(Route::Rtx { media: ssrc });
                }
            }
        }
        // A section that stopped forgets its streams: if it sends again on
        // the same SSRCs (a browser keeps them), its new track hears of them.
        let State {
            routes,
            sections,
            streams,
            rids,
            ..
        } = state;
        routes.retain(|ssrc, r| match r {
            Route::Media { section } if !sections[*section].active => {
                streams.remove(ssrc);
                rids.remove(ssrc);
                false
            }
            _ => true,
        });
        for s in &state.sections {
            debug!(mid = %s.taken.mid, active = s.active, codec = %s.taken.codec.name,
                payload_type = s.taken.codec.payload_type, rtx = ?s.taken.codec.rtx,
                rids = ?s.taken.rids, announced = ?s.announced, "uplink section");
        }
        if state.twcc_id != 0 && state.arrivals.is_none() {
            state.arrivals = Some(Arrivals::new(now));
        }
        if answered.iter().any(|a| matches!(a, Answered::Taken(_))) {
            // There is a transport to connect.
            state.answered_at.get_or_insert(now);
        }
        state.version += 1;
        let sdp = PublishAnswer {
            session: self.session,
            version: state.version,
            ufrag: conn.ufrag(),
            pwd: conn.pwd(),
            fingerprint: conn.fingerprint(),
            candidate: self.attachment.local_addr(),
            sections: &answered,
        }
        .to_sdp();
        self.flush(&mut conn);
        Ok(sdp)
    }

    /// Asks the client for a keyframe of `ssrc` (PLI).
    pub(crate) fn request_keyframe(&self, ssrc: u32) {
        let pli = rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
            sender_ssrc: self.ssrc,
            media_ssrc: ssrc,
        };
        self.send_rtcp(&[Box::new(pli)]);
    }

    /// Ends every track: the participant is gone.
    pub(crate) fn close(&self) {
        let mut state = self.state.lock().unwrap();
        for s in &mut state.sections {
            s.active = false;
            s.packets = None;
        }
    }

    fn send_rtcp(&self, packets: &[Box<dyn rtc::rtcp::Packet>]) {
        let Ok(compound) = rtc::rtcp::packet::marshal(packets) else {
            return;
        };
        let mut conn = self.conn.lock().unwrap();
        if let Ok(Some((to, sealed))) = conn.protect_rtcp(&compound) {
            self.attachment.send(to, &sealed);
        }
    }

    /// Sends what the connection queued (check answers, handshake records).
    fn flush(&self, conn: &mut Connection) {
        while let Some((to, datagram)) = conn.poll_transmit() {
            self.attachment.send(to, &datagram);
        }
    }

    fn rtp(&self, datagram: Bytes, now: Instant) {
        let mut buf = datagram;
        let mut packet = match rtp::Packet::unmarshal(&mut buf) {
            Ok(p) => p,
            Err(e) => {
                trace!("uplink RTP not read: {e}");
                return;
            }
        };
        let mut state = self.state.lock().unwrap();
        let state = &mut *state;
        if state.twcc_id != 0
            && let Some(value) = packet.header.get_extension(state.twcc_id)
            && value.len() >= 2
            && let Some(arrivals) = &mut state.arrivals
        {
            arrivals.record(u16::from_be_bytes([value[0], value[1]]), now);
        }
        let ssrc = packet.header.ssrc;
        let route = match state.routes.get(&ssrc) {
            Some(r) => *r,
            None => match learn(state, &packet) {
                Some(r) => r,
                None => {
                    trace!(ssrc, "uplink packet of no known stream");
                    return;
                }
            },
        };
        let (media_ssrc, section, repaired) = match route {
            Route::Media { section } => (ssrc, section, false),
            Route::Rtx { media } => {
                let Some(Route::Media { section }) = state.routes.get(&media).copied() else {
                    return;
                };
                let s = &state.sections[section];
                // RFC 4588: the original sequence number, then the payload.
                // Without it, a padding-only probe: nothing to forward.
                if packet.payload.len() < 2 || Some(packet.header.payload_type) != s.taken.codec.rtx
                {
                    return;
                }
                let osn = packet.payload.get_u16();
                packet.header.ssrc = media;
                packet.header.sequence_number = osn;
                packet.header.payload_type = s.taken.codec.payload_type;
                (media, section, true)
            }
        };
        let State {
            sections,
            streams,
            rids,
            rid_id,
            some_ssrc,
            ..
        } = state;
        let s = &mut sections[section];
        if !s.active || packet.header.payload_type != s.taken.codec.payload_type {
            trace!(mid = %s.taken.mid, ssrc, payload_type = packet.header.payload_type,
                "uplink packet of an inactive section or another codec");
            return;
        }
        // Padding only (probes): counted above, not forwarded.
        if packet.payload.is_empty() {
            return;
        }
        *some_ssrc = media_ssrc;
        let new_stream = !streams.contains_key(&media_ssrc);
        let nack = s.taken.feedback.iter().any(|f| f == "nack");
        let clock_rate = s.taken.codec.clock_rate;
        let stream = streams
            .entry(media_ssrc)
            .or_insert_with(|| InStream::new(media_ssrc, clock_rate, nack, now));
        let arrival = stream.receive(
            packet.header.sequence_number,
            packet.header.timestamp,
            now,
            repaired,
        );
        if arrival == Arrival::Duplicate {
            return;
        }
        if s.packets.is_none() {
            let (tx, rx) = mpsc::channel(QUEUE);
            let _ = self
                .events
                .send(UplinkEvent::Track(new_track(s, media_ssrc, rx)));
            s.packets = Some(tx);
        }
        let Some(tx) = &s.packets else { return };
        if new_stream {
            let rid = rid_of(*rid_id, &packet);
            if let Some(rid) = &rid {
                rids.insert(media_ssrc, rid.clone());
            }
            let _ = tx.try_send(Incoming::Open {
                ssrc: media_ssrc,
                rid,
            });
        }
        if tx.try_send(Incoming::Rtp(packet)).is_err() {
            trace!(mid = %s.taken.mid, "uplink queue full: packet dropped");
        }
    }

    fn rtcp(&self, compound: &[u8], now: Instant) {
        let mut buf = compound;
        let Ok(packets) = rtc::rtcp::packet::unmarshal(&mut buf) else {
            trace!("uplink RTCP not read");
            return;
        };
        let mut state = self.state.lock().unwrap();
        for p in &packets {
            let Some(sr) = p.as_any().downcast_ref::<SenderReport>() else {
                continue;
            };
            let Some(stream) = state.streams.get_mut(&sr.ssrc) else {
                continue;
            };
            stream.sender_report(sr.ntp_time, now);
            let Some(Route::Media { section }) = state.routes.get(&sr.ssrc).copied() else {
                continue;
            };
            if let Some(tx) = &state.sections[section].packets {
                let _ = tx.try_send(Incoming::SenderReport {
                    ssrc: sr.ssrc,
                    ntp: sr.ntp_time,
                    rtp_time: sr.rtp_time,
                });
            }
        }
    }

    /// NACKs, congestion feedback and reports that are due; whether the
    /// connection is still alive.
    fn tick(&self, now: Instant, report: bool, feedback: bool, disconnect: Duration) -> bool {
        let mut conn = self.conn.lock().unwrap();
        if conn.poll_timeout().is_some_and(|t| t <= now)
            && let Err(e) = conn.handle_timeout(now)
        {
            debug!("uplink handshake: {e}");
        }
        self.flush(&mut conn);
        drop(conn);
        let mut packets: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::new();
        let mut state = self.state.lock().unwrap();
        let connected = self.is_connected();
        if !connected {
            return state
                .answered_at
                .is_none_or(|at| now.saturating_duration_since(at) < CONNECT_WITHIN)
                || self.lost("connection failed");
        }
        if state.last_heard.is_some_and(|at| {
            now.saturating_duration_since(at) > disconnect + Duration::from_secs(5)
        }) {
            drop(state);
            return self.lost("connection lost");
        }
        for stream in state.streams.values_mut() {
            let missing = stream.nacks(now, None);
            if !missing.is_empty() {
                packets.push(Box::new(TransportLayerNack {
                    sender_ssrc: self.ssrc,
                    media_ssrc: stream.ssrc(),
                    nacks: nack_pairs(&missing),
                }));
            }
        }
        let some_ssrc = state.some_ssrc;
        if feedback && let Some(arrivals) = &mut state.arrivals {
            while let Some(cc) = arrivals.feedback(self.ssrc, some_ssrc) {
                packets.push(Box::new(cc));
            }
        }
        if report {
            let reports: Vec<_> = state
                .streams
                .values_mut()
                .filter_map(|s| s.report(now))
                .collect();
            // 31 blocks at most per report (a 5-bit count).
            for chunk in reports.chunks(31) {
                packets.push(Box::new(ReceiverReport {
                    ssrc: self.ssrc,
                    reports: chunk.to_vec(),
                    profile_extensions: Default::default(),
                }));
            }
        }
        drop(state);
        // A compound packet each, under a path MTU.
        for p in packets {
            self.send_rtcp(&[p]);
        }
        true
    }

    fn lost(&self, why: &'static str) -> bool {
        let _ = self.events.send(UplinkEvent::Lost(why));
        false
    }
}

/// An H.264 publisher is taken only in packetization mode 1 (what
/// browsers decode and the recorder reads).
fn accept_codec(c: &publish::OfferedCodec) -> bool {
    !c.name.eq_ignore_ascii_case("H264") || c.fmtp.contains("packetization-mode=1")
}

/// The track a section's first packet starts.
fn new_track(s: &Section, first_ssrc: u32, packets: mpsc::Receiver<Incoming>) -> NewTrack {
    let t = &s.taken;
    let kind = match t.kind {
        Kind::Audio => "audio",
        Kind::Video => "video",
    };
    NewTrack {
        kind: t.kind,
        codec: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec {
            mime_type: format!("{kind}/{}", t.codec.name),
            clock_rate: t.codec.clock_rate,
            channels: u16::from(t.codec.channels),
            sdp_fmtp_line: t.codec.fmtp.clone(),
            rtcp_feedback: Vec::new(),
        },
        track_id: s.track_id.clone(),
        first_ssrc,
        extensions: t
            .extensions
            .iter()
            .map(|(id, uri)| (uri.clone(), u16::from(*id)))
            .collect(),
        packets,
    }
}

/// The rid a packet names, if any.
fn rid_of(rid_id: u8, packet: &rtp::Packet) -> Option<String> {
    if rid_id == 0 {
        return None;
    }
    let value = packet.header.get_extension(rid_id)?;
    let rid = std::str::from_utf8(&value).ok()?;
    Some(rid.to_owned())
}

/// The route of an SSRC no offer announced, from the mid and rid (or
/// repaired rid) its first packets carry (RFC 8852, RFC 8843 §9.2).
fn learn(state: &mut State, packet: &rtp::Packet) -> Option<Route> {
    let ssrc = packet.header.ssrc;
    let mid = (state.mid_id != 0)
        .then(|| packet.header.get_extension(state.mid_id))
        .flatten()?;
    let section = state
        .sections
        .iter()
        .position(|s| s.active && s.taken.mid.as_bytes() == &mid[..])?;
    let repaired = (state.repaired_id != 0)
        .then(|| packet.header.get_extension(state.repaired_id))
        .flatten();
    let route = match repaired {
        Some(rid) => {
            // The media SSRC of the same rid, learnt from its own packets.
            let media = state.rids.iter().find_map(|(&media, r)| {
                (r.as_bytes() == &rid[..]
                    && matches!(state.routes.get(&media), Some(Route::Media { section: s }) if *s == section))
                    .then_some(media)
            })?;
            Route::Rtx { media }
        }
        None => Route::Media { section },
    };
    state.routes.insert(ssrc, route);
    Some(route)
}

/// Sequence numbers as NACK pairs: a first one and a bitmap of the 16 after.
fn nack_pairs(missing: &[u16]) -> Vec<NackPair> {
    let mut pairs: Vec<NackPair> = Vec::new();
    for &seq in missing {
        if let Some(last) = pairs.last_mut() {
            let d = seq.wrapping_sub(last.packet_id);
            if (1..=16).contains(&d) {
                last.lost_packets |= 1 << (d - 1);
                continue;
            }
        }
        pairs.push(NackPair {
            packet_id: seq,
            lost_packets: 0,
        });
    }
    pairs
}

impl Destination for Uplink {
    fn pwd(&self) -> &str {
        &self.attachment.pwd
    }

    /// Handled here, in the shared socket's reader (see the module doc).
    fn deliver(&self, from: SocketAddr, datagram: Bytes) -> Routed {
        let now = Instant::now();
        let mut conn = self.conn.lock().unwrap();
        let result = conn.handle(now, from, &datagram);
        self.flush(&mut conn);
        drop(conn);
        match result {
            Ok(Received::Nothing) => {}
            Ok(Received::Connected) => {
                debug!("uplink connected");
                self.state.lock().unwrap().last_heard = Some(now);
                self.connected.send_replace(true);
                let _ = self.events.send(UplinkEvent::Connected);
            }
            Ok(Received::Rtp(packet)) => {
                self.state.lock().unwrap().last_heard = Some(now);
                self.rtp(packet.freeze(), now);
            }
            Ok(Received::Rtcp(compound)) => {
                self.state.lock().unwrap().last_heard = Some(now);
                self.rtcp(&compound, now);
            }
            Err(e) => debug!(%from, "uplink datagram refused: {e}"),
        }
        Routed::Delivered
    }
}

/// Until the uplink is gone or lost.
async fn timer_loop(link: Weak<Uplink>, disconnect: Duration) {
    let mut ticks: u64 = 0;
    let mut reported = Instant::now();
    loop {
        tokio::time::sleep(TICK).await;
        let Some(l) = link.upgrade() else { return };
        ticks += 1;
        let now = Instant::now();
        let report = now >= reported + REPORT_EVERY;
        if report {
            reported = now;
        }
        if !l.tick(now, report, ticks.is_multiple_of(2), disconnect) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_sequence_numbers_become_nack_pairs() {
        let pairs = nack_pairs(&[10, 11, 26, 27, 65535, 0, 3]);
        let got: Vec<(u16, u16)> = pairs
            .iter()
            .map(|p| (p.packet_id, p.lost_packets))
            .collect();
        assert_eq!(got, [(10, 1 | 1 << 15), (27, 0), (65535, 1 | 1 << 3)]);
    }
}
