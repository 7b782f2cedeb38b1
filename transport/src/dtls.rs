//! DTLS-SRTP (RFC 5764): the handshake that authenticates the client by
//! the certificate fingerprint its description named, and the SRTP keys
//! exported from it. The server keeps one certificate for every connection,
//! as its fingerprint goes into every offer.

use crate::seal::{Gcm, Sealer};
use bytes::BytesMut;
use rtc::crypto::{HashAlgorithm, RTCCryptoProvider};
use rtc::dtls::config::{ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig};
use rtc::dtls::crypto::Certificate as DtlsCertificate;
use rtc::dtls::endpoint::{Endpoint, EndpointEvent};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::shared::TransportProtocol;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::Error;

/// The server's DTLS identity.
#[derive(Clone)]
pub struct Certificate {
    certificate: DtlsCertificate,
    crypto: Arc<dyn RTCCryptoProvider>,
    /// `sha-256 AB:CD:…`, as `a=fingerprint` gives it.
    fingerprint: String,
}

impl Certificate {
    /// A fresh self-signed ECDSA P-256 certificate.
    pub fn generate() -> Result<Self, Error> {
        let crypto = rtc::crypto::default_provider().map_err(|e| Error::Crypto(e.to_string()))?;
        let certificate =
            DtlsCertificate::generate_self_signed(vec!["confer".to_owned()], crypto.crypto())
                .map_err(|e| Error::Crypto(e.to_string()))?;
        let fingerprint = format!(
            "sha-256 {}",
            sha256_hex(&crypto, &certificate.certificate[0])?
        );
        Ok(Self {
            certificate,
            crypto,
            fingerprint,
        })
    }

    /// `sha-256 AB:CD:…`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

fn sha256_hex(crypto: &Arc<dyn RTCCryptoProvider>, der: &[u8]) -> Result<String, Error> {
    let hash = crypto
        .crypto()
        .hash(HashAlgorithm::Sha256, der)
        .map_err(|e| Error::Crypto(e.to_string()))?;
    let hex: Vec<String> = hash.iter().map(|b| format!("{b:02X}")).collect();
    Ok(hex.join(":"))
}

/// SRTP contexts for both directions once the handshake is done.
pub struct Keys {
    /// Protects what the server sends that is not a stream's (RTCP).
    pub local: Context,
    /// Checks and decrypts what the client sends.
    pub remote: Context,
    profile: ProtectionProfile,
    local_key: Vec<u8>,
    local_salt: Vec<u8>,
    crypto: Arc<dyn RTCCryptoProvider>,
}

impl Keys {
    /// What protects one outgoing stream, with the session's keys: sealed
    /// in place for AES-128-GCM ([`crate::seal`]), else a context of its own.
    pub fn stream_sealer(&self) -> Result<Sealer, Error> {
        if matches!(self.profile, ProtectionProfile::AeadAes128Gcm) {
            let gcm = Gcm::new(self.crypto.crypto(), &self.local_key, &self.local_salt)?;
            return Ok(Sealer::Gcm(gcm));
        }
        self.stream_context().map(Sealer::Context)
    }

    fn stream_context(&self) -> Result<Context, Error> {
        Context::new(
            &self.local_key,
            &self.local_salt,
            self.profile,
            None,
            None,
            self.crypto.crypto(),
        )
        .map_err(|e| Error::Srtp(e.to_string()))
    }
}

/// The server side of one client's DTLS association.
pub struct Handshake {
    endpoint: Endpoint,
    /// The association's key in `endpoint`: the address the first record
    /// came from. Records from any address the client has proven with a
    /// connectivity check go to it, so a client that moves keeps its keys.
    peer: Option<SocketAddr>,
    crypto: Arc<dyn RTCCryptoProvider>,
    /// Set when the server is the DTLS client: the config to connect with.
    client: Option<Arc<HandshakeConfig>>,
    done: bool,
}

impl Handshake {
    /// A handshake that accepts only a peer whose certificate's SHA-256 is
    /// `remote_fingerprint` (`AB:CD:…`, any case). `is_client` when the
    /// client answered `a=setup:passive`: then the server starts it
    /// ([`Self::start`]).
    pub fn new(
        certificate: &Certificate,
        remote_fingerprint: &str,
        is_client: bool,
    ) -> Result<Self, Error> {
        let expected = remote_fingerprint.to_ascii_uppercase();
        let crypto = certificate.crypto.clone();
        let check = crypto.clone();
        let config: HandshakeConfig = ConfigBuilder::default()
            .with_crypto_provider(crypto.clone())
            .with_certificates(vec![certificate.certificate.clone()])
            .with_srtp_protection_profiles(vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ])
            .with_client_auth(ClientAuthType::RequireAnyClientCert)
            // WebRTC certificates are self-signed: the fingerprint from the
            // description is the check, not a chain.
            .with_insecure_skip_verify(true)
            .with_verify_peer_certificate(Some(Arc::new(move |certs: &[Vec<u8>], _: &_| {
                let first = certs
                    .first()
                    .ok_or(rtc::shared::error::Error::ErrNonCertificate)?;
                match sha256_hex(&check, first) {
                    Ok(seen) if seen == expected => Ok(()),
                    _ => Err(rtc::shared::error::Error::ErrNoMatchingCertificateFingerprint),
                }
            })))
            .with_extended_master_secret(ExtendedMasterSecretType::Require)
            .build(is_client, None)
            .map_err(|e| Error::Dtls(e.to_string()))?;
        let config = Arc::new(config);
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let (server, client) = if is_client {
            (None, Some(config))
        } else {
            (Some(config), None)
        };
        Ok(Self {
            endpoint: Endpoint::new(unspecified, TransportProtocol::UDP, server),
            peer: None,
            crypto,
            client,
            done: false,
        })
    }

    /// Whether the server is the DTLS client and has not started yet.
    pub fn waits_to_start(&self) -> bool {
        self.client.is_some() && self.peer.is_none()
    }

    /// Sends the ClientHello to `to`, when the server is the DTLS client.
    pub fn start(&mut self, now: Instant, to: SocketAddr) -> Result<(), Error> {
        let Some(config) = &self.client else {
            return Ok(());
        };
        if self.peer.is_none() {
            self.peer = Some(to);
            self.endpoint
                .connect(now, to, config.clone(), None)
                .map_err(|e| Error::Dtls(e.to_string()))?;
        }
        Ok(())
    }

    /// Reads one DTLS datagram. Returns the SRTP keys when it completed the
    /// handshake; replies wait in [`Self::transmits`].
    pub fn read(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<Option<Keys>, Error> {
        let peer = *self.peer.get_or_insert(from);
        let events = self
            .endpoint
            .read(now, peer, None, BytesMut::from(datagram))
            .map_err(|e| Error::Dtls(e.to_string()))?;
        let mut keys = None;
        for event in events {
            match event {
                EndpointEvent::HandshakeComplete if !self.done => {
                    self.done = true;
                    keys = Some(self.export()?);
                }
                EndpointEvent::PeerClosed => return Err(Error::Closed),
                _ => {}
            }
        }
        Ok(keys)
    }

    /// Datagrams the handshake wants sent (flights, retransmissions, alerts).
    pub fn transmits(&mut self) -> impl Iterator<Item = BytesMut> + '_ {
        std::iter::from_fn(|| self.endpoint.poll_transmit().map(|t| t.message))
    }

    /// When a flight has to be sent again, until the handshake is done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.endpoint.poll_timeout(&self.peer?)
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        if let Some(peer) = self.peer {
            self.endpoint
                .handle_timeout(peer, now)
                .map_err(|e| Error::Dtls(e.to_string()))?;
        }
        Ok(())
    }

    fn export(&self) -> Result<Keys, Error> {
        let peer = self.peer.ok_or(Error::Closed)?;
        let state = self
            .endpoint
            .get_connection_state(peer)
            .ok_or(Error::Closed)?;
        let profile = match state.srtp_protection_profile() {
            SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm => ProtectionProfile::AeadAes128Gcm,
            SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80 => {
                ProtectionProfile::Aes128CmHmacSha1_80
            }
            other => return Err(Error::Dtls(format!("no SRTP profile agreed ({other:?})"))),
        };
        let mut config = rtc::srtp::config::Config {
            profile,
            ..Default::default()
        };
        let material = state
            .export_keying_material(
                rtc::srtp::config::LABEL_EXTRACTOR_DTLS_SRTP,
                &[],
                config.keying_material_len(),
            )
            .map_err(|e| Error::Dtls(e.to_string()))?;
        config
            .set_session_keys_from_keying_material(material.as_ref(), state.is_client())
            .map_err(|e| Error::Srtp(e.to_string()))?;
        let crypto = self.crypto.crypto();
        let keys = &config.keys;
        let srtp = |e: rtc::shared::error::Error| Error::Srtp(e.to_string());
        Ok(Keys {
            local: Context::new(
                &keys.local_master_key,
                &keys.local_master_salt,
                profile,
                None,
                None,
                crypto,
            )
            .map_err(srtp)?,
            remote: Context::new(
                &keys.remote_master_key,
                &keys.remote_master_salt,
                profile,
                Some(rtc::srtp::option::srtp_replay_protection(64)),
                Some(rtc::srtp::option::srtcp_replay_protection(64)),
                crypto,
            )
            .map_err(srtp)?,
            profile,
            local_key: keys.local_master_key.to_vec(),
            local_salt: keys.local_master_salt.to_vec(),
            crypto: self.crypto.clone(),
        })
    }
}
