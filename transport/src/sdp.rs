//! The server's offer and the client's answer (RFC 8829, RFC 8843 bundle).
//!
//! The server offers: it writes every media section itself, so the offer is
//! plain text from plain data. Of the answer it reads only what the
//! transport and the sender need: the client's ICE credentials and
//! certificate fingerprint, its DTLS role, and per section whether it was
//! accepted and with which payload types and header-extension ids.

use std::fmt::Write;
use std::net::SocketAddr;

use crate::Error;

/// Audio or video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Audio,
    Video,
}

/// A codec offered in a section.
#[derive(Clone, Debug)]
pub struct Codec {
    pub payload_type: u8,
    /// `opus`, `VP8`, …
    pub name: &'static str,
    pub clock_rate: u32,
    /// Audio channels; 0 for video.
    pub channels: u8,
    /// The `a=fmtp` parameters, if any.
    pub fmtp: String,
    /// `a=rtcp-fb` values (`nack`, `nack pli`, `ccm fir`, `transport-cc`).
    pub feedback: &'static [&'static str],
    /// The payload type of its retransmissions (RFC 4588), if it has them.
    pub rtx: Option<u8>,
}

/// One sending media section: one track to the client.
#[derive(Clone, Debug)]
pub struct Media {
    pub mid: String,
    pub kind: Kind,
    pub codecs: Vec<Codec>,
    /// Header extensions: id and URI.
    pub extensions: Vec<(u8, &'static str)>,
    pub ssrc: u32,
    /// The SSRC of its retransmissions, when a codec has them.
    pub rtx_ssrc: Option<u32>,
    /// `a=msid` stream and track ids.
    pub stream: String,
    pub track: String,
    /// `false` once the track is gone: the section stays, inactive, so the
    /// client's sections keep their order (RFC 8829 §5.2.2).
    pub sending: bool,
}

/// What goes into an offer besides its sections.
pub struct Offer<'a> {
    /// `o=` session id and version; the version rises with every offer.
    pub session: u64,
    pub version: u64,
    pub ufrag: &'a str,
    pub pwd: &'a str,
    /// `sha-256 AB:…`.
    pub fingerprint: &'a str,
    /// The server's one host candidate.
    pub candidate: SocketAddr,
    pub media: &'a [Media],
}

impl Offer<'_> {
    pub fn to_sdp(&self) -> String {
        let mut s = String::with_capacity(1024 + 1024 * self.media.len());
        let mids: Vec<&str> = self.media.iter().map(|m| m.mid.as_str()).collect();
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "v=0\r\no=- {} {} IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
             a=ice-lite\r\na=group:BUNDLE {}\r\na=msid-semantic: WMS *\r\n",
            self.session,
            self.version,
            mids.join(" ")
        );
        let ip = match self.candidate {
            SocketAddr::V4(_) => "IP4",
            SocketAddr::V6(_) => "IP6",
        };
        for media in self.media {
            let kind = match media.kind {
                Kind::Audio => "audio",
                Kind::Video => "video",
            };
            let mut types: Vec<String> = Vec::new();
            for codec in &media.codecs {
                types.push(codec.payload_type.to_string());
                if let Some(rtx) = codec.rtx {
                    types.push(rtx.to_string());
                }
            }
            let _ = write!(
                s,
                "m={kind} {port} UDP/TLS/RTP/SAVPF {types}\r\nc=IN {ip} {addr}\r\n\
                 a=mid:{mid}\r\na=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\n\
                 a=fingerprint:{fp}\r\na=setup:actpass\r\na=rtcp-mux\r\na=rtcp-rsize\r\n\
                 a={direction}\r\n",
                port = self.candidate.port(),
                types = types.join(" "),
                addr = self.candidate.ip(),
                mid = media.mid,
                ufrag = self.ufrag,
                pwd = self.pwd,
                fp = self.fingerprint,
                direction = if media.sending {
                    "sendonly"
                } else {
                    "inactive"
                },
            );
            for (id, uri) in &media.extensions {
                let _ = write!(s, "a=extmap:{id} {uri}\r\n");
            }
            for codec in &media.codecs {
                let pt = codec.payload_type;
                let _ = write!(s, "a=rtpmap:{pt} {}/{}", codec.name, codec.clock_rate);
                if codec.channels > 0 {
                    let _ = write!(s, "/{}", codec.channels);
                }
                s.push_str("\r\n");
                if !codec.fmtp.is_empty() {
                    let _ = write!(s, "a=fmtp:{pt} {}\r\n", codec.fmtp);
                }
                for fb in codec.feedback {
                    let _ = write!(s, "a=rtcp-fb:{pt} {fb}\r\n");
                }
                if let Some(rtx) = codec.rtx {
                    let _ = write!(
                        s,
                        "a=rtpmap:{rtx} rtx/{}\r\na=fmtp:{rtx} apt={pt}\r\n",
                        codec.clock_rate
                    );
                }
            }
            if media.sending {
                let _ = write!(s, "a=msid:{} {}\r\n", media.stream, media.track);
                if let Some(rtx) = media.rtx_ssrc {
                    let _ = write!(s, "a=ssrc-group:FID {} {rtx}\r\n", media.ssrc);
                }
                for ssrc in std::iter::once(media.ssrc).chain(media.rtx_ssrc) {
                    let _ = write!(
                        s,
                        "a=ssrc:{ssrc} cname:{stream}\r\na=ssrc:{ssrc} msid:{stream} {track}\r\n",
                        stream = media.stream,
                        track = media.track
                    );
                }
            }
            let _ = write!(
                s,
                "a=candidate:1 1 udp 2130706431 {} {} typ host\r\na=end-of-candidates\r\n",
                self.candidate.ip(),
                self.candidate.port()
            );
        }
        s
    }
}

/// The client's DTLS role (RFC 8842): `active` makes it the DTLS client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    Active,
    Passive,
}

/// A section of the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answered {
    pub mid: String,
    /// Port 0 or `a=inactive`/`recvonly` missing: the client refused it.
    pub accepted: bool,
    pub payload_types: Vec<u8>,
    pub extensions: Vec<(u8, String)>,
}

/// What the server needs of the client's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub ufrag: String,
    pub pwd: String,
    /// SHA-256 of the client's certificate, `AB:CD:…`.
    pub fingerprint: String,
    pub setup: Setup,
    pub media: Vec<Answered>,
}

/// Reads an answer. Every section must name a mid; credentials and the
/// fingerprint may sit at session level or in the sections (bundled
/// sections share them; the first one seen counts).
pub fn parse_answer(text: &str) -> Result<Answer, Error> {
    let bad = |what: String| Error::Sdp(what);
    let mut credentials = Credentials::default();
    let mut setup = None;
    let mut media: Vec<Answered> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        let at = |what: &str| bad(format!("line {}: {what}: {line:?}", n + 1));
        if let Some(m) = line.strip_prefix("m=") {
            let mut fields = m.split(' ');
            let (Some(_kind), Some(port), Some(_proto)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(at("an m-line needs kind, port, protocol and formats"));
            };
            let port: u16 = port.parse().map_err(|_| at("bad port"))?;
            let payload_types = fields
                .map(|f| f.parse::<u8>().map_err(|_| at("bad payload type")))
                .collect::<Result<Vec<_>, _>>()?;
            media.push(Answered {
                mid: String::new(),
                accepted: port != 0,
                payload_types,
                extensions: Vec::new(),
            });
            continue;
        }
        let Some(attribute) = line.strip_prefix("a=") else {
            continue;
        };
        let (name, value) = attribute.split_once(':').unwrap_or((attribute, ""));
        match name {
            "ice-ufrag" | "ice-pwd" | "fingerprint" => {
                credentials.read(name, value).map_err(at)?;
            }
            "setup" => {
                setup = Some(match value {
                    "active" => Setup::Active,
                    "passive" => Setup::Passive,
                    _ => return Err(at("an answer's setup is active or passive")),
                });
            }
            "mid" => {
                let m = media
                    .last_mut()
                    .ok_or_else(|| at("mid outside a media section"))?;
                m.mid = value.to_owned();
            }
            "inactive" | "sendonly" => {
                if let Some(m) = media.last_mut() {
                    m.accepted = false;
                }
            }
            "extmap" => {
                let m = media
                    .last_mut()
                    .ok_or_else(|| at("extmap outside a media section"))?;
                let (id, uri) = value
                    .split_once(' ')
                    .ok_or_else(|| at("extmap without a URI"))?;
                let id = id.split('/').next().unwrap_or(id);
                let id: u8 = id.parse().map_err(|_| at("bad extmap id"))?;
                m.extensions.push((id, uri.trim().to_owned()));
            }
            _ => {}
        }
    }
    if let Some(m) = media.iter().find(|m| m.mid.is_empty()) {
        return Err(bad(format!(
            "a media section has no mid (formats {:?})",
            m.payload_types
        )));
    }
    let (ufrag, pwd, fingerprint) = credentials.finish()?;
    Ok(Answer {
        ufrag,
        pwd,
        fingerprint,
        setup: setup.ok_or_else(|| bad("no a=setup".into()))?,
        media,
    })
}

/// A client's ICE credentials and certificate fingerprint, as either kind
/// of description carries them: at session level or in the sections
/// (bundled sections share them; the first one seen counts).
#[derive(Default)]
pub(crate) struct Credentials {
    ufrag: Option<String>,
    pwd: Option<String>,
    fingerprint: Option<String>,
}

impl Credentials {
    /// Reads `a=ice-ufrag`, `a=ice-pwd` or `a=fingerprint` (SHA-256 only).
    pub(crate) fn read(&mut self, name: &str, value: &str) -> Result<(), &'static str> {
        match name {
            "ice-ufrag" => {
                self.ufrag.get_or_insert_with(|| value.to_owned());
            }
            "ice-pwd" => {
                self.pwd.get_or_insert_with(|| value.to_owned());
            }
            "fingerprint" => {
                let (algorithm, hex) = value.split_once(' ').ok_or("fingerprint without a hash")?;
                if algorithm.eq_ignore_ascii_case("sha-256") {
                    self.fingerprint
                        .get_or_insert_with(|| hex.trim().to_ascii_uppercase());
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Ufrag, password and fingerprint, or which is missing.
    pub(crate) fn finish(self) -> Result<(String, String, String), Error> {
        let missing = |what: &str| Error::Sdp(format!("no {what}"));
        Ok((
            self.ufrag.ok_or_else(|| missing("a=ice-ufrag"))?,
            self.pwd.ok_or_else(|| missing("a=ice-pwd"))?,
            self.fingerprint
                .ok_or_else(|| missing("a=fingerprint with sha-256"))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chrome's answer to an offer of one audio and one video section
    /// (trimmed of attributes the server does not read).
    const CHROME_ANSWER: &str = "v=0\r\n\
        o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
        s=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0 1\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
        c=IN IP4 0.0.0.0\r\n\
        a=ice-ufrag:Xk3o\r\n\
        a=ice-pwd:f2KWbUSjLxvJ/4ZRvYp9Sc2I\r\n\
        a=ice-options:trickle\r\n\
        a=fingerprint:sha-256 0a:1B:2c:3D:4e:5F:6a:7B:8c:9D:aE:bF:c0:D1:e2:F3:04:15:26:37:48:59:6A:7B:8C:9D:AE:BF:C0:D1:E2:F3\r\n\
        a=setup:active\r\n\
        a=mid:0\r\n\
        a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n\
        a=recvonly\r\n\
        a=rtcp-mux\r\n\
        a=rtpmap:111 opus/48000/2\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\n\
        c=IN IP4 0.0.0.0\r\n\
        a=mid:1\r\n\
        a=extmap:3/recvonly http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n\
        a=recvonly\r\n\
        m=video 0 UDP/TLS/RTP/SAVPF 96\r\n\
        a=mid:2\r\n";

    #[test]
    fn a_browser_answer_gives_credentials_role_and_sections() {
        let answer = parse_answer(CHROME_ANSWER).unwrap();
        assert_eq!(answer.ufrag, "Xk3o");
        assert_eq!(answer.pwd, "f2KWbUSjLxvJ/4ZRvYp9Sc2I");
        assert!(answer.fingerprint.starts_with("0A:1B:2C:3D"));
        assert_eq!(answer.setup, Setup::Active);
        let twcc = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";
        assert_eq!(
            answer.media,
            [
                Answered {
                    mid: "0".into(),
                    accepted: true,
                    payload_types: vec![111],
                    extensions: vec![(3, twcc.into())],
                },
                Answered {
                    mid: "1".into(),
                    accepted: true,
                    payload_types: vec![96, 97],
                    extensions: vec![(3, twcc.into())],
                },
                Answered {
                    mid: "2".into(),
                    accepted: false,
                    payload_types: vec![96],
                    extensions: vec![],
                },
            ]
        );
    }

    #[test]
    fn a_broken_answer_is_refused_with_what_is_wrong() {
        let error = |text: &str| parse_answer(text).unwrap_err().to_string();
        let without = |line: &str| CHROME_ANSWER.replace(line, "");
        assert!(error(&without("a=ice-ufrag:Xk3o\r\n")).contains("no a=ice-ufrag"));
        assert!(error(&without("a=ice-pwd:f2KWbUSjLxvJ/4ZRvYp9Sc2I\r\n")).contains("no a=ice-pwd"));
        assert!(error(&without("a=setup:active\r\n")).contains("no a=setup"));
        assert!(error(&without("a=mid:1\r\n")).contains("has no mid"));
        let sha1 = CHROME_ANSWER.replace("sha-256", "sha-1");
        assert!(error(&sha1).contains("sha-256"));
        let actpass = CHROME_ANSWER.replace("a=setup:active", "a=setup:actpass");
        assert!(error(&actpass).contains("line 12: an answer's setup is active or passive"));
        let port = CHROME_ANSWER.replace("m=audio 9 ", "m=audio 99999 ");
        assert!(error(&port).contains("bad port"));
        let format = CHROME_ANSWER.replace("SAVPF 96 97", "SAVPF 96 x");
        assert!(error(&format).contains("bad payload type"));
        let extmap = CHROME_ANSWER.replace("a=extmap:3 ", "a=extmap:300 ");
        assert!(error(&extmap).contains("bad extmap id"));
        assert!(error("").contains("no a=ice-ufrag"));
        assert!(error("a=mid:0\r\n").contains("mid outside a media section"));
    }

    #[test]
    fn the_offer_is_bundled_ice_lite_and_names_each_track() {
        let media = [
            Media {
                mid: "0".into(),
                kind: Kind::Video,
                codecs: vec![Codec {
                    payload_type: 96,
                    name: "VP8",
                    clock_rate: 90000,
                    channels: 0,
                    fmtp: String::new(),
                    feedback: &["nack", "nack pli"],
                    rtx: Some(97),
                }],
                extensions: vec![(3, "urn:x")],
                ssrc: 10,
                rtx_ssrc: Some(11),
                stream: "alice".into(),
                track: "cam".into(),
                sending: true,
            },
            Media {
                mid: "1".into(),
                kind: Kind::Audio,
                codecs: vec![Codec {
                    payload_type: 111,
                    name: "opus",
                    clock_rate: 48000,
                    channels: 2,
                    fmtp: "minptime=10".into(),
                    feedback: &[],
                    rtx: None,
                }],
                extensions: vec![],
                ssrc: 20,
                rtx_ssrc: None,
                stream: "bob".into(),
                track: "mic".into(),
                sending: false,
            },
        ];
        let sdp = Offer {
            session: 7,
            version: 3,
            ufrag: "uf",
            pwd: "pw",
            fingerprint: "sha-256 AA:BB",
            candidate: "192.0.2.7:7882".parse().unwrap(),
            media: &media,
        }
        .to_sdp();
        for line in [
            "o=- 7 3 IN IP4 0.0.0.0",
            "a=ice-lite",
            "a=group:BUNDLE 0 1",
            "m=video 7882 UDP/TLS/RTP/SAVPF 96 97",
            "a=sendonly",
            "a=extmap:3 urn:x",
            "a=rtpmap:96 VP8/90000",
            "a=rtcp-fb:96 nack pli",
            "a=rtpmap:97 rtx/90000",
            "a=fmtp:97 apt=96",
            "a=ssrc-group:FID 10 11",
            "a=ssrc:11 msid:alice cam",
            "m=audio 7882 UDP/TLS/RTP/SAVPF 111",
            "a=rtpmap:111 opus/48000/2",
            "a=fmtp:111 minptime=10",
            "a=inactive",
            "a=candidate:1 1 udp 2130706431 192.0.2.7 7882 typ host",
        ] {
            assert!(sdp.contains(&format!("{line}\r\n")), "{line} in\n{sdp}");
        }
        // A section that no longer sends names no track.
        assert!(!sdp.contains("ssrc:20"));
        assert_eq!(sdp.matches("a=ice-ufrag:uf\r\n").count(), 2);
    }
}
