//! ICE-lite (RFC 8445 §2.5): the server has one host candidate, never
//! checks, and answers the client's connectivity checks. A check proves
//! itself with MESSAGE-INTEGRITY (HMAC-SHA1 keyed with the server's ICE
//! password), and its answer carries the address it came from.

use hmac::{Hmac, Mac};
use std::net::SocketAddr;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const USE_CANDIDATE: u16 = 0x0025;
const FINGERPRINT: u16 = 0x8028;
/// RFC 8489 §14.7: the CRC-32 is XORed with "STUN".
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// What the server needs of a STUN binding request.
#[derive(Clone, Copy, Debug)]
pub struct BindingRequest<'a> {
    /// The server's half of USERNAME ("ours:theirs", RFC 8445 §7.2.2).
    pub ufrag: &'a str,
    /// The client's half.
    pub remote_ufrag: &'a str,
    /// The transaction the answer repeats.
    pub transaction: [u8; 12],
    /// The controlling agent chose this pair (USE-CANDIDATE).
    pub nominated: bool,
    /// Offset of the MESSAGE-INTEGRITY attribute, if there is one.
    integrity: Option<usize>,
}

impl BindingRequest<'_> {
    /// Whether its MESSAGE-INTEGRITY is right for `password`.
    pub fn authentic(&self, datagram: &[u8], password: &[u8]) -> bool {
        let Some(at) = self.integrity else {
            return false;
        };
        let Some(tag) = datagram.get(at + 4..at + 24) else {
            return false;
        };
        integrity(datagram, at, password).is_some_and(|mac| mac.verify_slice(tag).is_ok())
    }
}

/// HMAC-SHA1 of the message before the attribute at `at`, with a header
/// length that ends at that attribute (RFC 8489 §14.5).
fn integrity(datagram: &[u8], at: usize, password: &[u8]) -> Option<Hmac<sha1::Sha1>> {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(password).ok()?;
    let length = (at + 24 - 20) as u16;
    mac.update(datagram.get(..2)?);
    mac.update(&length.to_be_bytes());
    mac.update(datagram.get(4..at)?);
    Some(mac)
}

/// `datagram` as a STUN binding request with an ICE username, or `None`
/// for anything else.
pub fn binding_request(datagram: &[u8]) -> Option<BindingRequest<'_>> {
    let header = datagram.get(..20)?;
    if u16::from_be_bytes([header[0], header[1]]) != BINDING_REQUEST || header[4..8] != MAGIC_COOKIE
    {
        return None;
    }
    let length = u16::from_be_bytes([header[2], header[3]]) as usize;
    let msg = datagram.get(..20 + length)?;
    let mut username = None;
    let mut integrity = None;
    let mut nominated = false;
    let mut at = 20;
    while at + 4 <= msg.len() {
        let kind = u16::from_be_bytes([msg[at], msg[at + 1]]);
        let len = u16::from_be_bytes([msg[at + 2], msg[at + 3]]) as usize;
        let value = msg.get(at + 4..at + 4 + len)?;
        match kind {
            USERNAME if username.is_none() => {
                username = Some(std::str::from_utf8(value).ok()?.split_once(':')?);
            }
            USE_CANDIDATE => nominated = true,
            // Attributes after it (FINGERPRINT) are not covered by it.
            MESSAGE_INTEGRITY if len == 20 => {
                integrity = Some(at);
                break;
            }
            _ => {}
        }
        // Attributes are padded to 4 bytes.
        at += 4 + len.next_multiple_of(4);
    }
    let (ufrag, remote_ufrag) = username?;
    Some(BindingRequest {
        ufrag,
        remote_ufrag,
        transaction: header[8..20].try_into().ok()?,
        nominated,
        integrity,
    })
}

/// Writes to `out` the success response to the check `transaction` that
/// came from `from`: XOR-MAPPED-ADDRESS, then MESSAGE-INTEGRITY with the
/// server's `password`, then FINGERPRINT.
pub fn binding_success(
    transaction: &[u8; 12],
    from: SocketAddr,
    password: &[u8],
    out: &mut Vec<u8>,
) {
    header(BINDING_SUCCESS, transaction, out);
    // XOR-MAPPED-ADDRESS (RFC 8489 §14.2): port XOR the cookie's top half,
    // address XOR the cookie (and the transaction, for IPv6).
    let port = from.port() ^ u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
    let mut mask = MAGIC_COOKIE.to_vec();
    mask.extend_from_slice(transaction);
    let (family, address): (u8, Vec<u8>) = match from {
        SocketAddr::V4(a) => (1, a.ip().octets().to_vec()),
        SocketAddr::V6(a) => (2, a.ip().octets().to_vec()),
    };
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(4 + address.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, family]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend(address.iter().zip(&mask).map(|(a, m)| a ^ m));
    seal(password, out);
}

/// Writes to `out` a connectivity check as a client sends it: USERNAME
/// (`server:client` ufrags), USE-CANDIDATE when `nominated`, then
/// MESSAGE-INTEGRITY with the server's `password` and FINGERPRINT.
pub fn connectivity_check(
    username: &str,
    password: &[u8],
    nominated: bool,
    transaction: &[u8; 12],
    out: &mut Vec<u8>,
) {
    header(BINDING_REQUEST, transaction, out);
    out.extend_from_slice(&USERNAME.to_be_bytes());
    out.extend_from_slice(&(username.len() as u16).to_be_bytes());
    out.extend_from_slice(username.as_bytes());
    out.resize(out.len().next_multiple_of(4), 0);
    if nominated {
        out.extend_from_slice(&USE_CANDIDATE.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    seal(password, out);
}

fn header(kind: u16, transaction: &[u8; 12], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&MAGIC_COOKIE);
    out.extend_from_slice(transaction);
}

/// Appends MESSAGE-INTEGRITY over everything so far, then FINGERPRINT, a
/// CRC-32 of everything before it with a length that includes it.
fn seal(password: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    if let Some(mac) = integrity(out, at, password) {
        out.extend_from_slice(&MESSAGE_INTEGRITY.to_be_bytes());
        out.extend_from_slice(&20u16.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
    }
    let length = (out.len() + 8 - 20) as u16;
    out[2..4].copy_from_slice(&length.to_be_bytes());
    let crc = crc32fast::hash(out) ^ FINGERPRINT_XOR;
    out.extend_from_slice(&FINGERPRINT.to_be_bytes());
    out.extend_from_slice(&4u16.to_be_bytes());
    out.extend_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding request naming `username`, with MESSAGE-INTEGRITY for
    /// `password` when there is one.
    fn check(username: &[u8], password: Option<&str>) -> Vec<u8> {
        let mut msg = vec![0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42];
        msg.extend_from_slice(&[7; 12]);
        // A SOFTWARE attribute first, 5 bytes padded to 8, to walk past.
        msg.extend_from_slice(&[0x80, 0x22, 0, 5]);
        msg.extend_from_slice(b"test\0\0\0\0");
        msg.extend_from_slice(&[0, 6]);
        msg.extend_from_slice(&(username.len() as u16).to_be_bytes());
        msg.extend_from_slice(username);
        msg.resize(msg.len().next_multiple_of(4), 0);
        if let Some(password) = password {
            let length = (msg.len() + 24 - 20) as u16;
            msg[2..4].copy_from_slice(&length.to_be_bytes());
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(password.as_bytes()).unwrap();
            mac.update(&msg);
            msg.extend_from_slice(&[0, 8, 0, 20]);
            msg.extend_from_slice(&mac.finalize().into_bytes());
        }
        let length = (msg.len() - 20) as u16;
        msg[2..4].copy_from_slice(&length.to_be_bytes());
        msg
    }

    fn ufrag(datagram: &[u8]) -> Option<&str> {
        binding_request(datagram).map(|r| r.ufrag)
    }

    /// RFC 5769 §2.1: a request with SOFTWARE, PRIORITY, ICE-CONTROLLED,
    /// USERNAME "evtj:h6vY", MESSAGE-INTEGRITY and FINGERPRINT.
    const RFC5769_REQUEST: &str = "000100582112a442b7e7a701bc34d686fa87dfae\
        802200105354554e207465737420636c69656e74\
        002400046e0001ff80290008932ff9b151263b36\
        000600096576746a3a68367659202020\
        000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2\
        80280004e57a3bcf";
    const RFC5769_PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_rfc_5769_sample_request_is_read_and_authenticated() {
        let msg = hex(RFC5769_REQUEST);
        let req = binding_request(&msg).unwrap();
        assert_eq!((req.ufrag, req.remote_ufrag), ("evtj", "h6vY"));
        assert_eq!(req.transaction[..4], [0xb7, 0xe7, 0xa7, 0x01]);
        assert!(!req.nominated);
        assert!(req.authentic(&msg, RFC5769_PASSWORD.as_bytes()));
        assert!(!req.authentic(&msg, b"VOkJxbRl1RmTxUk/WvJxBu"));
        // Any byte it covers changed (here the tie breaker) breaks it.
        let mut tampered = msg.clone();
        tampered[56] ^= 1;
        assert!(
            !binding_request(&tampered)
                .unwrap()
                .authentic(&tampered, RFC5769_PASSWORD.as_bytes())
        );
        // A request without MESSAGE-INTEGRITY proves nothing.
        let bare = check(b"evtj:h6vY", None);
        assert!(
            !binding_request(&bare)
                .unwrap()
                .authentic(&bare, RFC5769_PASSWORD.as_bytes())
        );
        // Ours agrees with the sample on how the digest is made.
        let ours = check(b"evtj:h6vY", Some(RFC5769_PASSWORD));
        assert!(
            binding_request(&ours)
                .unwrap()
                .authentic(&ours, RFC5769_PASSWORD.as_bytes())
        );
        let mut sealed = Vec::new();
        connectivity_check(
            "evtj:h6vY",
            RFC5769_PASSWORD.as_bytes(),
            true,
            &[3; 12],
            &mut sealed,
        );
        let req = binding_request(&sealed).unwrap();
        assert!(req.nominated);
        assert_eq!(req.transaction, [3; 12]);
        assert!(req.authentic(&sealed, RFC5769_PASSWORD.as_bytes()));
    }

    #[test]
    fn a_binding_request_is_named_by_the_first_half_of_its_username() {
        assert_eq!(ufrag(&check(b"sfuFrag:clientFrag", None)), Some("sfuFrag"));
    }

    #[test]
    fn anything_but_a_well_formed_binding_request_is_none() {
        let good = check(b"sfuFrag:clientFrag", Some("pw"));
        // A binding response (type 0x0101) is not a request.
        let mut response = good.clone();
        response[0] = 1;
        assert_eq!(ufrag(&response), None);
        // No magic cookie: RTP or DTLS that happens to start with 0x0001.
        let mut no_cookie = good.clone();
        no_cookie[4] = 0;
        assert_eq!(ufrag(&no_cookie), None);
        // Every truncation, and a length that claims more than is there.
        for cut in 0..good.len() {
            assert_eq!(ufrag(&good[..cut]), None, "cut at {cut}");
        }
        let mut too_long = good.clone();
        too_long[2] = 0xff;
        assert_eq!(ufrag(&too_long), None);
        // A username without the colon, or not UTF-8.
        assert_eq!(ufrag(&check(b"nocolon", None)), None);
        assert_eq!(ufrag(&check(b"\xff\xfe:x", None)), None);
        // Random bytes and empty input.
        assert_eq!(ufrag(&[]), None);
        assert_eq!(ufrag(&[0x80; 200]), None);
    }

    /// The answer, read back by webrtc-rs's own STUN code: an independent
    /// reading of the address, the integrity and the fingerprint.
    #[test]
    fn the_success_response_reads_back_with_webrtc_rs_stun() {
        use rtc::stun::{
            fingerprint::FINGERPRINT as CHECK_FINGERPRINT, integrity::MessageIntegrity,
        };
        use rtc::stun::{message::Getter, message::Message, xoraddr::XorMappedAddress};
        let crypto = rtc::crypto::default_provider().unwrap();
        for from in [
            "192.0.2.1:32853",
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
        ] {
            let from: SocketAddr = from.parse().unwrap();
            let mut out = Vec::new();
            binding_success(&[9; 12], from, b"secret", &mut out);
            let mut msg = Message::new();
            msg.unmarshal_binary(&out).unwrap();
            assert_eq!(msg.typ.value(), BINDING_SUCCESS);
            assert_eq!(msg.transaction_id.0, [9; 12]);
            let mut addr = XorMappedAddress::default();
            addr.get_from(&msg).unwrap();
            assert_eq!(SocketAddr::new(addr.ip, addr.port), from);
            CHECK_FINGERPRINT.check(&msg).unwrap();
            MessageIntegrity::check(&mut msg, b"secret", crypto.crypto()).unwrap();
            assert!(MessageIntegrity::check(&mut msg, b"secreT", crypto.crypto()).is_err());
        }
    }
}
