//! SRTP for one outgoing stream, sealed in place (RFC 3711 with
//! AEAD_AES_128_GCM, RFC 7714).
//!
//! webrtc-rs's SRTP context returns every protected packet in a new
//! buffer, copied from the plaintext, and looks its per-SSRC state up in a
//! hash map twice per packet. A stream knows its two SSRCs (media and
//! RTX), so it seals the packet where it was marshalled: no allocation, no
//! copy, no lookup. Other protection profiles keep the context.

use rtc::crypto::{AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, RTCCrypto};
use rtc::rtp::header::Header;
use rtc::srtp::context::Context;

use crate::Error;

/// The AES-GCM authentication tag appended to each packet.
pub const TAG_LEN: usize = 16;
/// RFC 3711 §4.3.1 key derivation labels.
const LABEL_ENCRYPTION: u8 = 0x00;
const LABEL_SALT: u8 = 0x02;

/// How a stream's packets are protected.
pub enum Sealer {
    /// AEAD_AES_128_GCM, in place.
    Gcm(Gcm),
    /// Any other profile, through webrtc-rs's context.
    Context(Context),
}

pub struct Gcm {
    aead: Box<dyn AeadCipher>,
    salt: [u8; 12],
    /// Rollover counters of the (at most two) SSRCs sent.
    counters: [Option<Rollover>; 2],
}

/// A sender's rollover counter (RFC 3711 §3.3.1) for one SSRC.
#[derive(Clone, Copy, Debug)]
struct Rollover {
    ssrc: u32,
    roc: u32,
    highest: u16,
}

impl Rollover {
    /// The rollover counter of the packet numbered `seq`: later than the
    /// highest sent moves the highest (and counts a wrap); earlier is a
    /// packet sent late, perhaps from before the last wrap.
    fn roc(&mut self, seq: u16) -> u32 {
        let ahead = seq.wrapping_sub(self.highest);
        if ahead == 0 {
            self.roc
        } else if ahead < 0x8000 {
            if seq < self.highest {
                self.roc = self.roc.wrapping_add(1);
            }
            self.highest = seq;
            self.roc
        } else if seq > self.highest && self.roc > 0 {
            self.roc - 1
        } else {
            // Before the first packet there was none to wrap from (as
            // webrtc-rs's context has it).
            self.roc
        }
    }
}

impl Gcm {
    /// Keys derived from the session's master key (16 bytes) and salt (12).
    pub fn new(
        crypto: &dyn RTCCrypto,
        master_key: &[u8],
        master_salt: &[u8],
    ) -> Result<Gcm, Error> {
        let key = derive(crypto, LABEL_ENCRYPTION, master_key, master_salt)?;
        let salt = derive(crypto, LABEL_SALT, master_key, master_salt)?;
        let aead = crypto
            .new_aead(AeadAlgorithm::Aes128Gcm, &key)
            .map_err(|e| Error::Srtp(e.to_string()))?;
        Ok(Gcm {
            aead,
            salt: salt[..12].try_into().expect("derived 16 bytes"),
            counters: [None; 2],
        })
    }

    /// Seals `packet[..len]`, an RTP packet whose header (`header`, of
    /// `header_len` bytes) is authenticated and whose payload is
    /// encrypted, and writes the tag after it: `packet` must have
    /// [`TAG_LEN`] bytes to spare. Returns the protected length.
    pub fn seal(
        &mut self,
        packet: &mut [u8],
        len: usize,
        header: &Header,
        header_len: usize,
    ) -> Result<usize, Error> {
        if packet.len() < len + TAG_LEN || header_len > len {
            return Err(Error::Srtp("no room for the tag".into()));
        }
        let roc = self
            .rollover(header.ssrc, header.sequence_number)
            .roc(header.sequence_number);
        // RFC 7714 §8.1: 00 00 || SSRC || ROC || SEQ, XORed with the salt.
        let mut nonce = [0u8; 12];
        nonce[2..6].copy_from_slice(&header.ssrc.to_be_bytes());
        nonce[6..10].copy_from_slice(&roc.to_be_bytes());
        nonce[10..12].copy_from_slice(&header.sequence_number.to_be_bytes());
        for (n, s) in nonce.iter_mut().zip(self.salt) {
            *n ^= s;
        }
        let (aad, rest) = packet.split_at_mut(header_len);
        let (payload, tail) = rest.split_at_mut(len - header_len);
        self.aead
            .seal_in_place(&nonce, aad, payload, &mut tail[..TAG_LEN])
            .map_err(|e| Error::Srtp(e.to_string()))?;
        Ok(len + TAG_LEN)
    }

    /// The counter of `ssrc`, which starts at the first packet, `first`.
    fn rollover(&mut self, ssrc: u32, first: u16) -> &mut Rollover {
        let at = self
            .counters
            .iter()
            .position(|c| c.is_some_and(|c| c.ssrc == ssrc))
            .or_else(|| self.counters.iter().position(Option::is_none))
            // A third SSRC: the oldest slot's stream is not sent any more.
            .unwrap_or(0);
        let slot = &mut self.counters[at];
        if slot.is_none_or(|c| c.ssrc != ssrc) {
            *slot = Some(Rollover {
                ssrc,
                roc: 0,
                highest: first,
            });
        }
        slot.as_mut().expect("just set")
    }
}

/// RFC 3711 §4.3.3 (AES-CM as the PRF), as RFC 7714 §11 uses it: `label`
/// XORed into the master salt, AES of that under the master key.
fn derive(
    crypto: &dyn RTCCrypto,
    label: u8,
    master_key: &[u8],
    master_salt: &[u8],
) -> Result<[u8; 16], Error> {
    if master_key.len() != 16 || master_salt.len() != 12 {
        return Err(Error::Srtp(
            "AES-128-GCM needs a 16-byte key and 12-byte salt".into(),
        ));
    }
    let mut block = [0u8; 16];
    block[..12].copy_from_slice(master_salt);
    block[7] ^= label;
    crypto
        .block_encrypt(BlockCipherAlgorithm::Aes128, master_key, &mut block)
        .map_err(|e| Error::Srtp(e.to_string()))?;
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rtc::rtp::packet::Packet;
    use rtc::shared::marshal::{Marshal, MarshalSize};
    use rtc::srtp::protection_profile::ProtectionProfile;

    const KEY: [u8; 16] = [0x3a; 16];
    const SALT: [u8; 12] = [0x5c; 12];

    fn context() -> Context {
        let crypto = rtc::crypto::default_provider().unwrap();
        Context::new(
            &KEY,
            &SALT,
            ProtectionProfile::AeadAes128Gcm,
            None,
            None,
            crypto.crypto(),
        )
        .unwrap()
    }

    fn packet(ssrc: u32, seq: u16) -> Packet {
        let mut header = Header {
            version: 2,
            payload_type: 96,
            sequence_number: seq,
            timestamp: u32::from(seq) * 3000,
            ssrc,
            ..Default::default()
        };
        header
            .set_extension(3, Bytes::from_static(&[1, 2]))
            .unwrap();
        Packet {
            header,
            payload: Bytes::from(vec![seq as u8; 100 + usize::from(seq % 7)]),
        }
    }

    fn sealed(gcm: &mut Gcm, p: &Packet) -> Vec<u8> {
        let mut buf = vec![0; p.marshal_size() + TAG_LEN];
        let n = p.marshal_to(&mut buf).unwrap();
        let len = gcm
            .seal(&mut buf, n, &p.header, p.header.marshal_size())
            .unwrap();
        buf.truncate(len);
        buf
    }

    /// Byte for byte what webrtc-rs's context makes (browsers decrypt
    /// that), through a sequence number wrap, packets sent late from before
    /// it, and two SSRCs (media and RTX) at different points.
    #[test]
    fn seals_as_webrtc_rs_does_through_wraps_and_late_packets() {
        let crypto = rtc::crypto::default_provider().unwrap();
        let mut gcm = Gcm::new(crypto.crypto(), &KEY, &SALT).unwrap();
        let mut reference = context();
        let mut sends: Vec<(u32, u16)> = Vec::new();
        sends.extend((65_530..=65_535).map(|s| (7, s)));
        sends.extend((0..4).map(|s| (7, s)));
        // Late: from before the wrap, then a repeat of a sent one.
        sends.extend([(7, 65_534), (7, 2), (7, 4)]);
        sends.extend((100..103).map(|s| (8, s)));
        sends.extend([(7, 5), (8, 103)]);
        for (ssrc, seq) in sends {
            let p = packet(ssrc, seq);
            let mut plain = vec![0; p.marshal_size()];
            p.marshal_to(&mut plain).unwrap();
            let expected = reference
                .encrypt_rtp_with_header(&plain, &p.header)
                .unwrap();
            assert_eq!(
                sealed(&mut gcm, &p),
                expected.to_vec(),
                "ssrc {ssrc} seq {seq}"
            );
        }
    }

    #[test]
    fn a_buffer_without_room_for_the_tag_is_refused() {
        let crypto = rtc::crypto::default_provider().unwrap();
        let mut gcm = Gcm::new(crypto.crypto(), &KEY, &SALT).unwrap();
        let p = packet(7, 1);
        let mut buf = vec![0; p.marshal_size()];
        let n = p.marshal_to(&mut buf).unwrap();
        assert!(
            gcm.seal(&mut buf, n, &p.header, p.header.marshal_size())
                .is_err()
        );
        assert!(Gcm::new(crypto.crypto(), &KEY[..8], &SALT).is_err());
    }
}
