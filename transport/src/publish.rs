//! A publishing client's offer and the server's answer: the other direction
//! of [`crate::sdp`], for the connection a client publishes on.
//!
//! The client offers what it sends (RFC 8829: `sendonly` sections, with
//! `a=rid` and `a=simulcast` for simulcast, RFC 8853); the server answers
//! each section it takes `recvonly` with one codec (and its RTX) and the
//! header extensions it reads, as ICE-lite and the DTLS server
//! (`a=setup:passive`). Everything else is refused with port 0, in place,
//! so the sections keep their order.

use std::fmt::Write;
use std::net::SocketAddr;

use crate::Error;
use crate::sdp::{Credentials, Kind};

/// A codec the client offers in a section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfferedCodec {
    pub payload_type: u8,
    /// As written: `opus`, `VP8`, `H264`, …
    pub name: String,
    pub clock_rate: u32,
    /// Audio channels; 0 where none are written.
    pub channels: u8,
    pub fmtp: String,
    /// `a=rtcp-fb` values for it (`nack`, `nack pli`, `transport-cc`, …).
    pub feedback: Vec<String>,
    /// The payload type of its retransmissions (`rtx` with `apt=` it).
    pub rtx: Option<u8>,
}

/// One section of the client's offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offered {
    pub mid: String,
    /// `None` for anything but audio and video (a data channel).
    pub kind: Option<Kind>,
    /// The m-line's media and protocol fields, to refuse it in kind.
    pub media: String,
    pub protocol: String,
    /// `sendonly` or `sendrecv`, with its port not 0 (or 0 and
    /// `a=bundle-only`, as Firefox writes every section but the first).
    pub sends: bool,
    port: u16,
    bundle_only: bool,
    pub codecs: Vec<OfferedCodec>,
    pub extensions: Vec<(u8, String)>,
    /// Those of them marked `sendonly` (Firefox), answered `recvonly`.
    pub sendonly_extensions: Vec<u8>,
    /// Simulcast streams by rid, in `a=simulcast:send` order (empty: none).
    pub rids: Vec<String>,
    /// SSRCs the client announced, each with its RTX SSRC (`ssrc-group:FID`).
    pub ssrcs: Vec<(u32, Option<u32>)>,
    /// `a=msid` stream and track ids.
    pub msid: Option<(String, String)>,
}

/// What the server needs of a publishing client's offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishOffer {
    pub ufrag: String,
    pub pwd: String,
    /// SHA-256 of the client's certificate, `AB:CD:…`.
    pub fingerprint: String,
    pub media: Vec<Offered>,
}

/// Most sections read from one offer; a meeting publishes a handful.
const MAX_SECTIONS: usize = 64;
/// Most simulcast streams per section (browsers send up to 4).
const MAX_RIDS: usize = 4;

/// Reads an offer. Credentials and the fingerprint may sit at session level
/// or in the sections (the first one seen counts); every section must name
/// a mid, and its DTLS role must let the server be the DTLS server.
pub fn parse_offer(text: &str) -> Result<PublishOffer, Error> {
    let bad = |what: String| Error::Sdp(what);
    let mut credentials = Credentials::default();
    let mut media: Vec<Offered> = Vec::new();
    // Until a=simulcast orders them: every a=rid with `send`.
    let mut send_rids: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        let at = |what: &str| bad(format!("line {}: {what}: {line:?}", n + 1));
        if let Some(m) = line.strip_prefix("m=") {
            finish_rids(media.last_mut(), &mut send_rids);
            if media.len() == MAX_SECTIONS {
                return Err(at("too many media sections"));
            }
            let mut fields = m.split(' ');
            let (Some(kind), Some(port), Some(protocol)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(at("an m-line needs kind, port, protocol and formats"));
            };
            let port: u16 = port.parse().map_err(|_| at("bad port"))?;
            let kind_of = match kind {
                "audio" => Some(Kind::Audio),
                "video" => Some(Kind::Video),
                _ => None,
            };
            let mut codecs = Vec::new();
            if kind_of.is_some() {
                for f in fields {
                    let payload_type: u8 = f.parse().map_err(|_| at("bad payload type"))?;
                    if payload_type > 127 {
                        return Err(at("bad payload type"));
                    }
                    codecs.push(OfferedCodec {
                        payload_type,
                        ..OfferedCodec::default()
                    });
                }
            }
            media.push(Offered {
                mid: String::new(),
                kind: kind_of,
                media: kind.to_owned(),
                protocol: protocol.to_owned(),
                // sendrecv is the default direction (RFC 4566 §6).
                sends: true,
                port,
                bundle_only: false,
                codecs,
                extensions: Vec::new(),
                sendonly_extensions: Vec::new(),
                rids: Vec::new(),
                ssrcs: Vec::new(),
                msid: None,
            });
            continue;
        }
        let Some(attribute) = line.strip_prefix("a=") else {
            continue;
        };
        let (name, value) = attribute.split_once(':').unwrap_or((attribute, ""));
        let section = media.last_mut();
        match name {
            "ice-ufrag" | "ice-pwd" | "fingerprint" => {
                credentials.read(name, value).map_err(at)?;
            }
            "setup" => {
                if !matches!(value, "actpass" | "active") {
                    return Err(at("an offer's setup must let the server be DTLS server"));
                }
            }
            _ => {
                let Some(m) = section else { continue };
                read_media_attribute(m, name, value, &mut send_rids).map_err(at)?;
            }
        }
    }
    finish_rids(media.last_mut(), &mut send_rids);
    if let Some(m) = media.iter().find(|m| m.mid.is_empty()) {
        return Err(bad(format!("a {} section has no mid", m.media)));
    }
    for m in &mut media {
        // Payload types the offer lists but never describes are dropped.
        m.codecs.retain(|c| !c.name.is_empty());
        m.sends &= m.port != 0 || m.bundle_only;
    }
    let (ufrag, pwd, fingerprint) = credentials.finish()?;
    Ok(PublishOffer {
        ufrag,
        pwd,
        fingerprint,
        media,
    })
}

fn read_media_attribute(
    m: &mut Offered,
    name: &str,
    value: &str,
    send_rids: &mut Vec<String>,
) -> Result<(), &'static str> {
    match name {
        "mid" => m.mid = value.to_owned(),
        "recvonly" | "inactive" => m.sends = false,
        "bundle-only" => m.bundle_only = true,
        "msid" => {
            let mut ids = value.split(' ');
            if let (Some(stream), Some(track)) = (ids.next(), ids.next()) {
                m.msid = Some((stream.to_owned(), track.to_owned()));
            }
        }
        "extmap" => {
            let (id, uri) = value.split_once(' ').ok_or("extmap without a URI")?;
            let (id, direction) = id.split_once('/').unwrap_or((id, "sendrecv"));
            let id: u8 = id.parse().map_err(|_| "bad extmap id")?;
            if !(1..=255).contains(&id) {
                return Err("bad extmap id");
            }
            match direction {
                // Only on what the client receives: nothing to read here.
                "recvonly" | "inactive" => {}
                "sendonly" => {
                    m.extensions.push((id, uri.trim().to_owned()));
                    m.sendonly_extensions.push(id);
                }
                _ => m.extensions.push((id, uri.trim().to_owned())),
            }
        }
        "rtpmap" => {
            let (pt, codec) = value.split_once(' ').ok_or("rtpmap without a codec")?;
            let pt: u8 = pt.parse().map_err(|_| "bad rtpmap payload type")?;
            let mut parts = codec.split('/');
            let name = parts.next().unwrap_or_default();
            let clock_rate: u32 = parts
                .next()
                .and_then(|r| r.parse().ok())
                .ok_or("rtpmap without a clock rate")?;
            let channels: u8 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            if let Some(c) = m.codecs.iter_mut().find(|c| c.payload_type == pt) {
                c.name = name.to_owned();
                c.clock_rate = clock_rate;
                c.channels = channels;
            }
        }
        "fmtp" => {
            let (pt, params) = value.split_once(' ').ok_or("fmtp without parameters")?;
            let pt: u8 = pt.parse().map_err(|_| "bad fmtp payload type")?;
            if let Some(c) = m.codecs.iter_mut().find(|c| c.payload_type == pt) {
                c.fmtp = params.trim().to_owned();
            }
            // RTX names the codec it repairs (RFC 4588 §8.6).
            if let Some(apt) = params
                .split(';')
                .find_map(|p| p.trim().strip_prefix("apt="))
                .and_then(|a| a.parse::<u8>().ok())
                && let Some(c) = m.codecs.iter_mut().find(|c| c.payload_type == apt)
            {
                c.rtx = Some(pt);
            }
        }
        "rtcp-fb" => {
            let (pt, fb) = value.split_once(' ').ok_or("rtcp-fb without a value")?;
            let fb = fb.trim().to_owned();
            if pt == "*" {
                m.codecs
                    .iter_mut()
                    .for_each(|c| c.feedback.push(fb.clone()));
            } else {
                let pt: u8 = pt.parse().map_err(|_| "bad rtcp-fb payload type")?;
                if let Some(c) = m.codecs.iter_mut().find(|c| c.payload_type == pt) {
                    c.feedback.push(fb);
                }
            }
        }
        "rid" => {
            let mut fields = value.split(' ');
            if let (Some(rid), Some("send")) = (fields.next(), fields.next()) {
                if rid.is_empty()
                    || rid.len() > 16
                    || !rid
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err("bad rid");
                }
                if send_rids.len() == MAX_RIDS {
                    return Err("too many rids");
                }
                send_rids.push(rid.to_owned());
            }
        }
        "simulcast" => {
            let list = value
                .strip_prefix("send ")
                .ok_or("simulcast other than send")?;
            // `q;h;f`, alternatives `a,b` in a place: the first counts; `~`
            // marks one paused at first, which is still sent later.
            let ordered: Vec<String> = list
                .split(';')
                .filter_map(|place| place.split(',').next())
                .map(|rid| rid.trim_start_matches('~').to_owned())
                .collect();
            if ordered.iter().any(|r| !send_rids.contains(r)) {
                return Err("simulcast names a rid no a=rid line sends");
            }
            *send_rids = ordered;
            if send_rids.len() > MAX_RIDS {
                return Err("too many rids");
            }
        }
        "ssrc-group" => {
            let mut fields = value.split(' ');
            if fields.next() == Some("FID") {
                let (Some(media), Some(rtx)) = (fields.next(), fields.next()) else {
                    return Err("ssrc-group FID needs two SSRCs");
                };
                let media: u32 = media.parse().map_err(|_| "bad ssrc")?;
                let rtx: u32 = rtx.parse().map_err(|_| "bad ssrc")?;
                // Its `a=ssrc` lines may have come first.
                m.ssrcs.retain(|(s, _)| *s != rtx);
                match m.ssrcs.iter_mut().find(|(s, _)| *s == media) {
                    Some(entry) => entry.1 = Some(rtx),
                    None => m.ssrcs.push((media, Some(rtx))),
                }
            }
        }
        "ssrc" => {
            let ssrc = value.split(' ').next().unwrap_or_default();
            let ssrc: u32 = ssrc.parse().map_err(|_| "bad ssrc")?;
            let known = m
                .ssrcs
                .iter()
                .any(|(s, rtx)| *s == ssrc || *rtx == Some(ssrc));
            if !known {
                if m.ssrcs.len() == MAX_SECTIONS {
                    return Err("too many ssrcs");
                }
                m.ssrcs.push((ssrc, None));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The rids a section sends, once the section has ended.
fn finish_rids(section: Option<&mut Offered>, send_rids: &mut Vec<String>) {
    if let Some(m) = section {
        m.rids = std::mem::take(send_rids);
    }
    send_rids.clear();
}

/// A section the server takes: what it receives there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taken {
    pub mid: String,
    pub kind: Kind,
    /// The one codec it receives (with its RTX, if both sides have it).
    pub codec: OfferedCodec,
    /// The offered header extensions the server reads, with the client's ids.
    pub extensions: Vec<(u8, String)>,
    /// Those of them to answer `recvonly` (offered `sendonly`).
    pub recvonly_extensions: Vec<u8>,
    pub rids: Vec<String>,
    /// RTCP feedback the server gives the client, of what it offered.
    pub feedback: Vec<String>,
    /// False for a section the client does not send on (a watch-only
    /// client's `recvonly` one): answered `inactive`, but bundled, so the
    /// connection still comes up and can carry it once it sends.
    pub receiving: bool,
}

/// A section of the answer: taken, or refused in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answered {
    Taken(Taken),
    Refused {
        mid: String,
        media: String,
        protocol: String,
    },
}

impl Answered {
    pub fn mid(&self) -> &str {
        match self {
            Answered::Taken(t) => &t.mid,
            Answered::Refused { mid, .. } => mid,
        }
    }
}

/// Header extensions a receiving server reads.
pub const READ_EXTENSIONS: &[&str] = &[
    "urn:ietf:params:rtp-hdrext:sdes:mid",
    "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
    "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
    "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
];

/// Feedback the server gives a sender, where offered.
const GIVEN_FEEDBACK: &[&str] = &["nack", "nack pli", "ccm fir", "transport-cc"];

/// What to answer for `offered`: the first offered codec whose name is in
/// `codecs` (case-insensitive, e.g. `["opus", "VP8", "H264"]`), with
/// `accept` deciding on its parameters (an H.264 profile, say); refused
/// when none fits or it is neither audio nor video. A section that does
/// not send is taken, not receiving.
pub fn take(
    offered: &Offered,
    codecs: &[&str],
    accept: impl Fn(&OfferedCodec) -> bool,
) -> Answered {
    let refused = || Answered::Refused {
        mid: offered.mid.clone(),
        media: offered.media.clone(),
        protocol: offered.protocol.clone(),
    };
    let Some(kind) = offered.kind else {
        return refused();
    };
    let Some(codec) = offered
        .codecs
        .iter()
        .find(|c| codecs.iter().any(|n| n.eq_ignore_ascii_case(&c.name)) && accept(c))
    else {
        return refused();
    };
    let mut codec = codec.clone();
    // Its RTX only where the offer describes it as RTX.
    codec.rtx = codec.rtx.filter(|rtx| {
        offered
            .codecs
            .iter()
            .any(|c| c.payload_type == *rtx && c.name.eq_ignore_ascii_case("rtx"))
    });
    let feedback = codec
        .feedback
        .iter()
        .filter(|f| GIVEN_FEEDBACK.contains(&f.as_str()))
        .cloned()
        .collect();
    Answered::Taken(Taken {
        mid: offered.mid.clone(),
        kind,
        codec,
        extensions: offered
            .extensions
            .iter()
            .filter(|(_, uri)| READ_EXTENSIONS.contains(&uri.as_str()))
            .cloned()
            .collect(),
        recvonly_extensions: offered.sendonly_extensions.clone(),
        rids: offered.rids.clone(),
        feedback,
        receiving: offered.sends,
    })
}

/// The server's answer.
pub struct PublishAnswer<'a> {
    /// `o=` session id and version.
    pub session: u64,
    pub version: u64,
    pub ufrag: &'a str,
    pub pwd: &'a str,
    /// `sha-256 AB:…`.
    pub fingerprint: &'a str,
    pub candidate: SocketAddr,
    pub sections: &'a [Answered],
}

impl PublishAnswer<'_> {
    pub fn to_sdp(&self) -> String {
        let mut s = String::with_capacity(1024 + 768 * self.sections.len());
        let bundled: Vec<&str> = self
            .sections
            .iter()
            .filter_map(|a| match a {
                Answered::Taken(t) => Some(t.mid.as_str()),
                Answered::Refused { .. } => None,
            })
            .collect();
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "v=0\r\no=- {} {} IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=ice-lite\r\n",
            self.session, self.version
        );
        if !bundled.is_empty() {
            let _ = write!(s, "a=group:BUNDLE {}\r\n", bundled.join(" "));
        }
        s.push_str("a=msid-semantic: WMS\r\n");
        let (ip, addr) = match self.candidate {
            SocketAddr::V4(a) => ("IP4", a.ip().to_string()),
            SocketAddr::V6(a) => ("IP6", a.ip().to_string()),
        };
        for section in self.sections {
            let t = match section {
                Answered::Refused {
                    mid,
                    media,
                    protocol,
                } => {
                    // A refused section keeps a format from the offer's kind.
                    let format = if protocol.contains("SCTP") {
                        "webrtc-datachannel"
                    } else {
                        "0"
                    };
                    let _ = write!(
                        s,
                        "m={media} 0 {protocol} {format}\r\nc=IN {ip} {addr}\r\n\
                         a=mid:{mid}\r\na=inactive\r\n"
                    );
                    continue;
                }
                Answered::Taken(t) => t,
            };
            let kind = match t.kind {
                Kind::Audio => "audio",
                Kind::Video => "video",
            };
            let c = &t.codec;
            let pt = c.payload_type;
            let mut types = pt.to_string();
            if let Some(rtx) = c.rtx {
                let _ = write!(types, " {rtx}");
            }
            let _ = write!(
                s,
                "m={kind} {port} UDP/TLS/RTP/SAVPF {types}\r\nc=IN {ip} {addr}\r\n\
                 a=mid:{mid}\r\na=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n\
                 a=fingerprint:{fp}\r\na=setup:passive\r\na=rtcp-mux\r\na=rtcp-rsize\r\n\
                 a={direction}\r\n",
                port = self.candidate.port(),
                mid = t.mid,
                ufrag = self.ufrag,
                pwd = self.pwd,
                fp = self.fingerprint,
                direction = if t.receiving { "recvonly" } else { "inactive" },
            );
            for (id, uri) in &t.extensions {
                let direction = if t.recvonly_extensions.contains(id) {
                    "/recvonly"
                } else {
                    ""
                };
                let _ = write!(s, "a=extmap:{id}{direction} {uri}\r\n");
            }
            let _ = write!(s, "a=rtpmap:{pt} {}/{}", c.name, c.clock_rate);
            if c.channels > 0 {
                let _ = write!(s, "/{}", c.channels);
            }
            s.push_str("\r\n");
            if !c.fmtp.is_empty() {
                let _ = write!(s, "a=fmtp:{pt} {}\r\n", c.fmtp);
            }
            for fb in &t.feedback {
                let _ = write!(s, "a=rtcp-fb:{pt} {fb}\r\n");
            }
            if let Some(rtx) = c.rtx {
                let _ = write!(
                    s,
                    "a=rtpmap:{rtx} rtx/{}\r\na=fmtp:{rtx} apt={pt}\r\n",
                    c.clock_rate
                );
            }
            if !t.rids.is_empty() && t.receiving {
                for rid in &t.rids {
                    let _ = write!(s, "a=rid:{rid} recv\r\n");
                }
                let _ = write!(s, "a=simulcast:recv {}\r\n", t.rids.join(";"));
            }
            let _ = write!(
                s,
                "a=candidate:1 1 udp 2130706431 {addr} {port} typ host\r\na=end-of-candidates\r\n",
                port = self.candidate.port()
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Offers of a microphone and a camera, with and without three simulcast
    // streams, as Chromium 14x and Firefox ESR 153 wrote them.
    const CHROME_SIMULCAST: &str = include_str!("../testdata/chrome-publish-simulcast.sdp");
    const CHROME_SINGLE: &str = include_str!("../testdata/chrome-publish-single.sdp");
    const FIREFOX_SIMULCAST: &str = include_str!("../testdata/firefox-publish-simulcast.sdp");
    const FIREFOX_SINGLE: &str = include_str!("../testdata/firefox-publish-single.sdp");

    fn video(offer: &PublishOffer) -> &Offered {
        offer
            .media
            .iter()
            .find(|m| m.kind == Some(Kind::Video))
            .unwrap()
    }

    fn take_default(m: &Offered) -> Answered {
        take(m, &["opus", "VP8", "VP9", "H264"], |_| true)
    }

    #[test]
    fn browser_offers_give_credentials_codecs_rids_and_ssrcs() {
        let chrome = parse_offer(CHROME_SIMULCAST).unwrap();
        assert_eq!(chrome.ufrag, "uqjf");
        assert!(chrome.fingerprint.starts_with("68:B0:99"));
        assert_eq!(chrome.media.len(), 2);
        let audio = &chrome.media[0];
        assert_eq!(
            (audio.mid.as_str(), audio.kind, audio.sends),
            ("0", Some(Kind::Audio), true)
        );
        assert_eq!(audio.codecs[0].name, "opus");
        assert_eq!(
            (audio.codecs[0].clock_rate, audio.codecs[0].channels),
            (48000, 2)
        );
        assert_eq!(audio.ssrcs, [(3425858337, None)]);
        let v = video(&chrome);
        assert_eq!(v.rids, ["q", "h", "f"]);
        assert!(v.ssrcs.is_empty());
        let vp8 = &v.codecs[0];
        assert_eq!(
            (vp8.name.as_str(), vp8.payload_type, vp8.rtx),
            ("VP8", 96, Some(97))
        );
        assert!(vp8.feedback.iter().any(|f| f == "nack pli"));

        let chrome = parse_offer(CHROME_SINGLE).unwrap();
        assert_eq!(video(&chrome).ssrcs, [(3056548304, Some(2255583438))]);
        assert!(video(&chrome).rids.is_empty());

        // Firefox: session-level fingerprint, a=ssrc lines before their groups.
        let firefox = parse_offer(FIREFOX_SIMULCAST).unwrap();
        assert!(firefox.fingerprint.starts_with("77:27:10"));
        let v = video(&firefox);
        assert!(v.sends);
        assert_eq!(v.rids, ["q", "h", "f"]);
        assert_eq!(
            v.ssrcs,
            [
                (925191773, Some(3123627531)),
                (2599981291, Some(2896071453)),
                (4167239917, Some(497856559))
            ]
        );
        assert!(parse_offer(FIREFOX_SINGLE).is_ok());
        // With max-bundle, Firefox gives every section but the first port 0
        // and a=bundle-only: they still send.
        let bundled = FIREFOX_SIMULCAST.replace("m=video 9 ", "m=video 0 ").replace(
            "a=sendonly\r\na=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=extmap:4",
            "a=sendonly\r\na=bundle-only\r\na=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\r\na=extmap:4",
        );
        assert!(bundled.contains("a=bundle-only"));
        assert!(video(&parse_offer(&bundled).unwrap()).sends);
        let rejected = FIREFOX_SIMULCAST.replace("m=video 9 ", "m=video 0 ");
        assert!(!video(&parse_offer(&rejected).unwrap()).sends);
    }

    #[test]
    fn the_answer_takes_one_codec_and_the_extensions_read_and_receives_simulcast() {
        for text in [CHROME_SIMULCAST, FIREFOX_SIMULCAST] {
            let offer = parse_offer(text).unwrap();
            let sections: Vec<Answered> = offer.media.iter().map(take_default).collect();
            let Answered::Taken(v) = &sections[1] else {
                panic!("video refused")
            };
            assert_eq!(v.codec.name, "VP8");
            assert!(v.codec.rtx.is_some());
            assert!(
                v.extensions
                    .iter()
                    .all(|(_, u)| READ_EXTENSIONS.contains(&u.as_str()))
            );
            assert_eq!(v.extensions.len(), 4, "{:?}", v.extensions);
            let sdp = PublishAnswer {
                session: 1,
                version: 2,
                ufrag: "uf",
                pwd: "pw",
                fingerprint: "sha-256 AA:BB",
                candidate: "127.0.0.1:7882".parse().unwrap(),
                sections: &sections,
            }
            .to_sdp();
            let feedback = format!("a=rtcp-fb:{} transport-cc", v.codec.payload_type);
            for line in [
                feedback.as_str(),
                "a=ice-lite",
                "a=group:BUNDLE 0 1",
                "a=setup:passive",
                "a=recvonly",
                "a=rid:q recv",
                "a=simulcast:recv q;h;f",
                "a=candidate:1 1 udp 2130706431 127.0.0.1 7882 typ host",
            ] {
                assert!(sdp.contains(&format!("{line}\r\n")), "{line} in\n{sdp}");
            }
            assert!(!sdp.contains("abs-send-time"));
            // Firefox marks the rid extensions sendonly: answered recvonly.
            if text == FIREFOX_SIMULCAST {
                assert!(sdp.contains(
                    "a=extmap:9/recvonly urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n"
                ));
            }
            assert!(!sdp.contains("a=ssrc"));
        }
    }

    #[test]
    fn sections_it_cannot_take_are_refused_in_place() {
        let offer = parse_offer(
            &(CHROME_SINGLE
                .replace("a=mid:0\r\n", "a=mid:0\r\na=recvonly\r\n")
                .replace("a=sendonly\r\n", "")
                + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:2\r\n"),
        )
        .unwrap();
        let sections: Vec<Answered> = offer
            .media
            .iter()
            .map(|m| take(m, &["opus"], |_| true))
            .collect();
        let mids: Vec<&str> = sections.iter().map(Answered::mid).collect();
        assert_eq!(mids, ["0", "1", "2"]);
        // recvonly audio: taken, not receiving; video of no codec taken
        // and a data channel refused.
        assert!(matches!(&sections[0], Answered::Taken(t) if !t.receiving));
        assert!(
            sections[1..]
                .iter()
                .all(|s| matches!(s, Answered::Refused { .. }))
        );
        let sdp = PublishAnswer {
            session: 1,
            version: 1,
            ufrag: "uf",
            pwd: "pw",
            fingerprint: "sha-256 AA",
            candidate: "127.0.0.1:9".parse().unwrap(),
            sections: &sections,
        }
        .to_sdp();
        assert!(sdp.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"));
        assert!(sdp.contains("a=inactive\r\n"));
        assert!(sdp.contains("m=video 0 UDP/TLS/RTP/SAVPF 0\r\n"));
        assert!(sdp.contains("m=application 0 UDP/DTLS/SCTP webrtc-datachannel\r\n"));
        assert!(sdp.contains("a=group:BUNDLE 0\r\n"));
    }

    #[test]
    fn a_broken_offer_is_refused_with_what_is_wrong() {
        let error = |text: &str| parse_offer(text).unwrap_err().to_string();
        let chrome = CHROME_SIMULCAST;
        assert!(error(&chrome.replace("a=ice-ufrag:uqjf\r\n", "")).contains("no a=ice-ufrag"));
        assert!(error(&chrome.replace("a=mid:1\r\n", "")).contains("video section has no mid"));
        assert!(
            error(&chrome.replace("a=setup:actpass", "a=setup:passive")).contains("DTLS server")
        );
        assert!(error(&chrome.replace("a=rid:h send", "a=rid:h! send")).contains("bad rid"));
        assert!(
            error(&chrome.replace("a=simulcast:send q;h;f", "a=simulcast:send q;h;x"))
                .contains("names a rid no a=rid line sends")
        );
        assert!(error(&chrome.replace("a=extmap:4 ", "a=extmap:0 ")).contains("bad extmap id"));
        assert!(error(&chrome.replace("SAVPF 96 97", "SAVPF 96 200")).contains("bad payload type"));
        let many = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:x\r\n".repeat(MAX_SECTIONS + 1);
        assert!(error(&many).contains("too many media sections"));
        assert!(error("").contains("no a=ice-ufrag"));
    }
}
