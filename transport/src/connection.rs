//! One client's connection: connectivity checks answered (ICE-lite), the
//! DTLS handshake, then SRTP both ways. Sans I/O: the caller hands it every
//! datagram from the client and sends what it returns.
//!
//! Datagrams are told apart by their first byte (RFC 7983): STUN 0–3, DTLS
//! 20–63, RTP and RTCP 128–191. Only addresses that proved the server's ICE
//! password with a check may talk DTLS or SRTP; anything else is dropped.

use bytes::BytesMut;
use rand::Rng;
use rand::distr::Alphanumeric;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use crate::dtls::{Certificate, Handshake, Keys};
use crate::publish::PublishOffer;
use crate::sdp::{Answer, Setup};
use crate::stream::{OutStream, Rtx};
use crate::{Error, ice};

/// Addresses remembered as proven; a client checks a few candidate pairs.
const MAX_PROVEN: usize = 8;
/// DTLS records kept while the answer is on its way: a client may finish
/// its checks and start the handshake before signaling delivers it.
const EARLY_RECORDS: usize = 8;

/// What a datagram from the client was.
#[derive(Debug)]
pub enum Received {
    /// Handled here (a check, a handshake record) or dropped.
    Nothing,
    /// The handshake just completed: media can flow.
    Connected,
    /// A decrypted RTCP compound packet.
    Rtcp(BytesMut),
    /// A decrypted RTP packet.
    Rtp(BytesMut),
}

pub struct Connection {
    certificate: Certificate,
    ufrag: String,
    pwd: String,
    remote_ufrag: Option<String>,
    handshake: Option<Handshake>,
    early: Vec<(SocketAddr, Vec<u8>)>,
    keys: Option<Keys>,
    proven: VecDeque<SocketAddr>,
    /// Where media goes: the pair the client nominated, or the last one
    /// that checked before it did.
    selected: Option<SocketAddr>,
    last_check: Option<Instant>,
    transmits: VecDeque<(SocketAddr, Vec<u8>)>,
}

fn random(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

impl Connection {
    /// A connection with fresh ICE credentials (RFC 8839 §5.4: at least 24
    /// bits of ufrag and 128 of password).
    pub fn new(certificate: Certificate) -> Self {
        Self::with_credentials(certificate, random(8), random(24))
    }

    pub fn with_credentials(certificate: Certificate, ufrag: String, pwd: String) -> Self {
        Self {
            certificate,
            ufrag,
            pwd,
            remote_ufrag: None,
            handshake: None,
            early: Vec::new(),
            keys: None,
            proven: VecDeque::new(),
            selected: None,
            last_check: None,
            transmits: VecDeque::new(),
        }
    }

    pub fn ufrag(&self) -> &str {
        &self.ufrag
    }

    pub fn pwd(&self) -> &str {
        &self.pwd
    }

    pub fn fingerprint(&self) -> &str {
        self.certificate.fingerprint()
    }

    /// Takes the client's answer to the first offer. Later answers change
    /// nothing here (same transport, RFC 8843 bundle).
    pub fn apply_answer(&mut self, now: Instant, answer: &Answer) -> Result<(), Error> {
        let is_client = answer.setup == Setup::Passive;
        self.remote_description(now, &answer.ufrag, &answer.fingerprint, is_client)
    }

    /// Takes a publishing client's first offer: the server answers
    /// `a=setup:passive` and is the DTLS server ([`crate::publish`]). Later
    /// offers change nothing here.
    pub fn apply_offer(&mut self, now: Instant, offer: &PublishOffer) -> Result<(), Error> {
        self.remote_description(now, &offer.ufrag, &offer.fingerprint, false)
    }

    fn remote_description(
        &mut self,
        now: Instant,
        ufrag: &str,
        fingerprint: &str,
        is_client: bool,
    ) -> Result<(), Error> {
        if self.handshake.is_some() {
            return Ok(());
        }
        self.remote_ufrag = Some(ufrag.to_owned());
        self.handshake = Some(Handshake::new(&self.certificate, fingerprint, is_client)?);
        for (from, record) in std::mem::take(&mut self.early) {
            self.dtls(now, from, &record)?;
        }
        self.start_handshake(now)
    }

    /// As the DTLS client, starts the handshake once a pair is checked.
    fn start_handshake(&mut self, now: Instant) -> Result<(), Error> {
        if let (Some(handshake), Some(to)) = (&mut self.handshake, self.selected)
            && handshake.waits_to_start()
        {
            handshake.start(now, to)?;
            for datagram in handshake.transmits() {
                self.transmits.push_back((to, datagram.to_vec()));
            }
        }
        Ok(())
    }

    /// Whether SRTP keys are in place.
    pub fn is_connected(&self) -> bool {
        self.keys.is_some()
    }

    /// Where media goes, once a pair has been checked.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.selected
    }

    /// When the client last proved it is there (browsers check every few
    /// seconds for consent, RFC 7675).
    pub fn last_check(&self) -> Option<Instant> {
        self.last_check
    }

    /// Handles one datagram from `from`.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Received, Error> {
        match datagram.first() {
            Some(0..=3) => {
                self.check(now, from, datagram);
                self.start_handshake(now)?;
                Ok(Received::Nothing)
            }
            Some(20..=63) if self.proven.contains(&from) => self.dtls(now, from, datagram),
            Some(128..=191) if self.proven.contains(&from) => self.srtp(datagram),
            _ => Ok(Received::Nothing),
        }
    }

    fn check(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let Some(req) = ice::binding_request(datagram) else {
            tracing::debug!(%from, "not a binding request with an ICE username");
            return;
        };
        let refused = if req.ufrag != self.ufrag {
            Some("for another ufrag")
        } else if self
            .remote_ufrag
            .as_deref()
            .is_some_and(|theirs| theirs != req.remote_ufrag)
        {
            Some("from another client's ufrag")
        } else if !req.authentic(datagram, self.pwd.as_bytes()) {
            Some("without our password's MESSAGE-INTEGRITY")
        } else {
            None
        };
        if let Some(why) = refused {
            tracing::debug!(%from, ufrag = req.remote_ufrag, "check refused: {why}");
            return;
        }
        if !self.proven.contains(&from) {
            if self.proven.len() == MAX_PROVEN {
                self.proven.pop_front();
            }
            self.proven.push_back(from);
        }
        if req.nominated || self.selected.is_none() {
            self.selected = Some(from);
        }
        self.last_check = Some(now);
        let mut response = Vec::with_capacity(64);
        ice::binding_success(&req.transaction, from, self.pwd.as_bytes(), &mut response);
        self.transmits.push_back((from, response));
    }

    fn dtls(&mut self, now: Instant, from: SocketAddr, record: &[u8]) -> Result<Received, Error> {
        let Some(handshake) = &mut self.handshake else {
            if self.early.len() < EARLY_RECORDS {
                self.early.push((from, record.to_vec()));
            }
            return Ok(Received::Nothing);
        };
        let keys = handshake.read(now, from, record);
        for datagram in handshake.transmits() {
            self.transmits.push_back((from, datagram.to_vec()));
        }
        match keys? {
            Some(keys) => {
                self.keys = Some(keys);
                Ok(Received::Connected)
            }
            None => Ok(Received::Nothing),
        }
    }

    fn srtp(&mut self, datagram: &[u8]) -> Result<Received, Error> {
        let Some(keys) = &mut self.keys else {
            return Ok(Received::Nothing);
        };
        let srtp = |e: rtc::shared::error::Error| Error::Srtp(e.to_string());
        // RFC 5761 §4: RTCP packet types 192–223 sit where RTP has marker
        // and payload type.
        if (192..=223).contains(&datagram.get(1).copied().unwrap_or(0)) {
            Ok(Received::Rtcp(
                keys.remote.decrypt_rtcp(datagram).map_err(srtp)?,
            ))
        } else {
            Ok(Received::Rtp(
                keys.remote.decrypt_rtp(datagram).map_err(srtp)?,
            ))
        }
    }

    /// An outgoing stream with an SRTP context of its own (see
    /// [`OutStream`]); `None` until connected.
    pub fn out_stream(
        &self,
        ssrc: u32,
        clock_rate: u32,
        rtx: Option<Rtx>,
        keep: usize,
    ) -> Option<Result<OutStream, Error>> {
        let keys = self.keys.as_ref()?;
        Some(
            keys.stream_sealer()
                .map(|sealer| OutStream::new(ssrc, clock_rate, sealer, rtx, keep)),
        )
    }

    /// Encrypts an RTP packet for the client; `None` until connected.
    pub fn protect_rtp(&mut self, packet: &[u8]) -> Result<Option<(SocketAddr, BytesMut)>, Error> {
        let (Some(keys), Some(to)) = (&mut self.keys, self.selected) else {
            return Ok(None);
        };
        let sealed = keys
            .local
            .encrypt_rtp(packet)
            .map_err(|e| Error::Srtp(e.to_string()))?;
        Ok(Some((to, sealed)))
    }

    /// Encrypts an RTCP compound packet for the client; `None` until connected.
    pub fn protect_rtcp(&mut self, packet: &[u8]) -> Result<Option<(SocketAddr, BytesMut)>, Error> {
        let (Some(keys), Some(to)) = (&mut self.keys, self.selected) else {
            return Ok(None);
        };
        let sealed = keys
            .local
            .encrypt_rtcp(packet)
            .map_err(|e| Error::Srtp(e.to_string()))?;
        Ok(Some((to, sealed)))
    }

    /// Check answers and handshake records to send.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmits.pop_front()
    }

    /// When [`Self::handle_timeout`] is due (handshake retransmissions).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.handshake.as_ref()?.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        let Some(handshake) = &mut self.handshake else {
            return Ok(());
        };
        handshake.handle_timeout(now)?;
        if let Some(to) = self.selected {
            for datagram in handshake.transmits() {
                self.transmits.push_back((to, datagram.to_vec()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(conn: &Connection, remote_ufrag: &str, password: &str, nominated: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let username = format!("{}:{remote_ufrag}", conn.ufrag());
        ice::connectivity_check(
            &username,
            password.as_bytes(),
            nominated,
            &[1; 12],
            &mut out,
        );
        out
    }

    fn connection() -> Connection {
        Connection::new(Certificate::generate().unwrap())
    }

    #[test]
    fn only_a_check_with_the_password_is_answered_and_proves_its_address() {
        let mut conn = connection();
        let now = Instant::now();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:2000".parse().unwrap();
        let forged = check(&conn, "cli", "guess", true);
        assert!(matches!(
            conn.handle(now, a, &forged),
            Ok(Received::Nothing)
        ));
        assert!(conn.poll_transmit().is_none());
        assert_eq!(conn.remote(), None);
        // DTLS and media from an address no check proved are dropped unread.
        for datagram in [
            &[22u8, 254, 253, 0][..],
            &[0x80, 96, 0, 1][..],
            &[0x80, 200, 0, 1][..],
        ] {
            assert!(matches!(
                conn.handle(now, a, datagram),
                Ok(Received::Nothing)
            ));
        }
        assert!(conn.early.is_empty());

        let pwd = conn.pwd().to_owned();
        let good = check(&conn, "cli", &pwd, false);
        conn.handle(now, a, &good).unwrap();
        let (to, response) = conn.poll_transmit().unwrap();
        assert_eq!(to, a);
        assert_eq!(u16::from_be_bytes([response[0], response[1]]), 0x0101);
        assert_eq!(conn.remote(), Some(a));
        assert_eq!(conn.last_check(), Some(now));
        // A second pair checked without nomination does not take over; the
        // nominated one does.
        conn.handle(now, b, &good).unwrap();
        assert_eq!(conn.remote(), Some(a));
        conn.handle(now, b, &check(&conn, "cli", &pwd, true))
            .unwrap();
        assert_eq!(conn.remote(), Some(b));
        // Not connected yet: nothing to protect with.
        assert!(
            conn.protect_rtp(&[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1])
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn records_before_the_answer_wait_for_it_and_are_bounded() {
        let mut conn = connection();
        let now = Instant::now();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let pwd = conn.pwd().to_owned();
        conn.handle(now, a, &check(&conn, "cli", &pwd, true))
            .unwrap();
        for _ in 0..20 {
            conn.handle(now, a, &[22, 254, 253, 0, 0]).unwrap();
        }
        assert_eq!(conn.early.len(), EARLY_RECORDS);
    }

    #[test]
    fn after_the_answer_a_check_must_name_the_client_ufrag_it_gave() {
        let mut conn = connection();
        let now = Instant::now();
        let answer = Answer {
            ufrag: "cli".into(),
            pwd: "clientpassword".into(),
            fingerprint: "AA:BB".into(),
            setup: Setup::Active,
            media: vec![],
        };
        conn.apply_answer(now, &answer).unwrap();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let pwd = conn.pwd().to_owned();
        conn.handle(now, a, &check(&conn, "other", &pwd, true))
            .unwrap();
        assert!(conn.poll_transmit().is_none());
        conn.handle(now, a, &check(&conn, "cli", &pwd, true))
            .unwrap();
        assert!(conn.poll_transmit().is_some());
    }
}
