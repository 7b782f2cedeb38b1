//! The bare-limit probe: the least work any SFU must do per packet, to show
//! how close Confer comes to it. The forwarder receives a publisher's SRTP
//! packet on one UDP socket, decrypts it once, and for each other member of
//! the room encrypts it with that member's key and sends it, with the cipher
//! suite Confer negotiates (AEAD_AES_128_GCM) and the same SRTP code
//! (webrtc-rs's). Muted microphones' silence (RFC 6464 level 127) is dropped,
//! as Confer does. It does nothing else: no ICE, no DTLS handshake (keys
//! come in the hello), no RTCP, no header rewriting, no congestion control.
//!
//! Its participants are the generator's ([`Participant`]), measured as those
//! joining Confer or Janus are.
//!
//! Datagrams that are not RTP (first byte not `0b10xxxxxx`) are control:
//! `CLP1` + key (16) + salt (12) + room joins, answered `CLP1ok`; `CLP1bye`
//! leaves.

use crate::media::{self, Kind, Marker, TrackSource};
use crate::peer::{Publish, Shared};
use crate::stats::{Sent, Subscriber};
use anyhow::bail;
use rtc::shared::marshal::Marshal;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PROFILE: ProtectionProfile = ProtectionProfile::AeadAes128Gcm;
const KEY_LEN: usize = 16;
const SALT_LEN: usize = 12;
const HELLO: &[u8] = b"CLP1";
const WELCOME: &[u8] = b"CLP1ok";
const BYE: &[u8] = b"CLP1bye";
/// The one-byte header extension id publishers put the audio level in.
const AUDIO_LEVEL_ID: u8 = 1;
const AUDIO_PT: u8 = 111;
const VIDEO_PT: u8 = 96;

fn srtp_context(key: &[u8], salt: &[u8]) -> anyhow::Result<Context> {
    let provider = rtc::crypto::default_provider()?;
    Ok(Context::new(
        key,
        salt,
        PROFILE,
        None,
        None,
        provider.crypto(),
    )?)
}

fn is_rtp(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b >> 6 == 2)
}

/// The RFC 6464 level in a plain RTP packet's one-byte header extension
/// `AUDIO_LEVEL_ID`, read in place.
fn audio_level(packet: &[u8]) -> Option<u8> {
    if packet.len() < 12 || packet[0] & 0x10 == 0 {
        return None;
    }
    let at = 12 + 4 * usize::from(packet[0] & 0x0f);
    let ext = packet.get(at..at + 4)?;
    if ext[0..2] != [0xbe, 0xde] {
        return None;
    }
    let words = usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    let body = packet.get(at + 4..at + 4 + 4 * words)?;
    let mut i = 0;
    while i < body.len() {
        let (id, len) = (body[i] >> 4, usize::from(body[i] & 0x0f) + 1);
        if id == 0 {
            i += 1; // padding
            continue;
        }
        if id == AUDIO_LEVEL_ID {
            return body.get(i + 1).map(|b| b & 0x7f);
        }
        i += 1 + len;
    }
    None
}

struct Member {
    addr: SocketAddr,
    room: usize,
    /// Decrypts what this member sends.
    inbound: Context,
    /// Encrypts what it receives.
    outbound: Context,
}

/// Runs the forwarder on `socket` until the process ends. Single-threaded:
/// the probe is what one core can do.
pub fn forward(socket: UdpSocket) -> anyhow::Result<()> {
    let mut members: Vec<Member> = Vec::new();
    let mut by_addr: HashMap<SocketAddr, usize> = HashMap::new();
    let mut rooms: Vec<Vec<usize>> = Vec::new();
    let mut room_ids: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let datagram = &buf[..n];
        if !is_rtp(datagram) {
            control(
                datagram,
                from,
                &socket,
                &mut members,
                &mut by_addr,
                &mut rooms,
                &mut room_ids,
            );
            continue;
        }
        let Some(&sender) = by_addr.get(&from) else {
            continue;
        };
        let Ok(plain) = members[sender].inbound.decrypt_rtp(datagram) else {
            continue;
        };
        if audio_level(&plain) == Some(media::SILENT_LEVEL) {
            continue;
        }
        for &to in &rooms[members[sender].room] {
            if to == sender {
                continue;
            }
            let m = &mut members[to];
            if let Ok(out) = m.outbound.encrypt_rtp(&plain) {
                let _ = socket.send_to(&out, m.addr);
            }
        }
    }
}

fn control(
    datagram: &[u8],
    from: SocketAddr,
    socket: &UdpSocket,
    members: &mut Vec<Member>,
    by_addr: &mut HashMap<SocketAddr, usize>,
    rooms: &mut Vec<Vec<usize>>,
    room_ids: &mut HashMap<Vec<u8>, usize>,
) {
    if datagram == BYE {
        if let Some(i) = by_addr.remove(&from) {
            rooms[members[i].room].retain(|&m| m != i);
        }
        return;
    }
    let Some(rest) = datagram.strip_prefix(HELLO) else {
        return;
    };
    if rest.len() <= KEY_LEN + SALT_LEN || by_addr.contains_key(&from) {
        // Malformed, or a repeated hello: answer again, change nothing.
        if by_addr.contains_key(&from) {
            let _ = socket.send_to(WELCOME, from);
        }
        return;
    }
    let (key, rest) = rest.split_at(KEY_LEN);
    let (salt, room) = rest.split_at(SALT_LEN);
    let (Ok(inbound), Ok(outbound)) = (srtp_context(key, salt), srtp_context(key, salt)) else {
        return;
    };
    let next_room = rooms.len();
    let room = *room_ids.entry(room.to_vec()).or_insert(next_room);
    if room == rooms.len() {
        rooms.push(Vec::new());
    }
    let index = members.len();
    members.push(Member {
        addr: from,
        room,
        inbound,
        outbound,
    });
    by_addr.insert(from, index);
    rooms[room].push(index);
    let _ = socket.send_to(WELCOME, from);
}

/// The forwarder's one socket, with buffers for bursts: every publisher's
/// keyframe arriving at once, a webinar's fan-out leaving at once (the
/// kernel caps them at net.core.rmem_max and wmem_max).
pub fn bind(listen: SocketAddr) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    const BUFFER: usize = 4 << 20;
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.set_recv_buffer_size(BUFFER)?;
    socket.set_send_buffer_size(BUFFER)?;
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

/// A simulated participant of the probe: one UDP socket that publishes
/// generated media and receives the others'.
pub struct Participant {
    socket: Arc<tokio::net::UdpSocket>,
    forwarder: SocketAddr,
    key: [u8; KEY_LEN + SALT_LEN],
    publish: Publish,
    pub stats: Arc<Mutex<Subscriber>>,
    pub sent: Arc<Sent>,
    connected: Arc<AtomicBool>,
    receiving: tokio::task::JoinHandle<()>,
}

impl Participant {
    pub async fn join(
        forwarder: SocketAddr,
        room: &str,
        publish: Publish,
        started_us: u64,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Participant> {
        let socket =
            Arc::new(tokio::net::UdpSocket::bind(SocketAddr::new(shared.bind_ip, 0)).await?);
        let key: [u8; KEY_LEN + SALT_LEN] = rand::random();
        let mut hello = HELLO.to_vec();
        hello.extend_from_slice(&key);
        hello.extend_from_slice(room.as_bytes());
        let stats = Arc::new(Mutex::new(Subscriber::new(started_us)));
        let connected = Arc::new(AtomicBool::new(false));
        let inbound = srtp_context(&key[..KEY_LEN], &key[KEY_LEN..])?;
        let receiving = tokio::spawn(receive(
            socket.clone(),
            inbound,
            stats.clone(),
            connected.clone(),
            shared,
        ));
        // Loopback rarely drops a datagram, but a hello is cheap to repeat.
        for _ in 0..50 {
            socket.send_to(&hello, forwarder).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if connected.load(Ordering::Relaxed) {
                return Ok(Participant {
                    socket,
                    forwarder,
                    key,
                    publish,
                    stats,
                    sent: Arc::default(),
                    connected,
                    receiving,
                });
            }
        }
        receiving.abort();
        bail!("the probe forwarder at {forwarder} does not answer")
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn start_publishing(&self, index: u32, speaking: bool, shared: Arc<Shared>) {
        let kinds: &[(Kind, u8)] = match self.publish {
            Publish::Nothing => &[],
            Publish::Audio => &[(Kind::Audio, AUDIO_PT)],
            Publish::AudioVideo => &[(Kind::Audio, AUDIO_PT), (Kind::Video, VIDEO_PT)],
        };
        for &(kind, pt) in kinds {
            let source = TrackSource::new(kind, (index, speaking), rand::random(), pt);
            let Ok(outbound) = srtp_context(&self.key[..KEY_LEN], &self.key[KEY_LEN..]) else {
                continue;
            };
            tokio::spawn(publish(
                source,
                outbound,
                (self.socket.clone(), self.forwarder),
                self.sent.clone(),
                shared.clone(),
            ));
        }
    }

    pub async fn leave(&self) {
        self.receiving.abort();
        let _ = self.socket.send_to(BYE, self.forwarder).await;
    }
}

async fn receive(
    socket: Arc<tokio::net::UdpSocket>,
    mut inbound: Context,
    stats: Arc<Mutex<Subscriber>>,
    connected: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    // Runs until the participant leaves, so what is in flight when the
    // publishers stop still arrives.
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok(n) = socket.recv(&mut buf).await else {
            return;
        };
        let datagram = &buf[..n];
        if datagram == WELCOME {
            connected.store(true, Ordering::Relaxed);
            continue;
        }
        let Ok(plain) = inbound.decrypt_rtp(datagram) else {
            continue;
        };
        let now = media::clock();
        shared.counters.add_received(n);
        if let Some(m) = Marker::read(&plain) {
            stats.lock().unwrap().on_packet(m, now);
        }
    }
}

async fn publish(
    mut source: TrackSource,
    mut outbound: Context,
    (socket, forwarder): (Arc<tokio::net::UdpSocket>, SocketAddr),
    sent: Arc<Sent>,
    shared: Arc<Shared>,
) {
    let mut stop = shared.stop.clone();
    let mut pacer = shared.pacer(source.kind);
    let mut tick = tokio::time::interval(source.interval(&shared.video));
    tick.set_missed_tick_behavior(pacer.missed_ticks());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        for out in source.next_packets(&shared.video) {
            pacer.wait_for(out.bytes()).await;
            let (counter, mut pkt) = out.stamped();
            if source.kind == Kind::Audio {
                let level = source.audio_level() | if source.is_speaking() { 0x80 } else { 0 };
                let _ = pkt
                    .header
                    .set_extension(AUDIO_LEVEL_ID, bytes::Bytes::from(vec![level]));
            }
            let Ok(plain) = pkt.marshal() else {
                return;
            };
            let Ok(protected) = outbound.encrypt_rtp(&plain) else {
                return;
            };
            if socket.send_to(&protected, forwarder).await.is_err() {
                return;
            }
            sent.record(source.kind, counter);
            shared.counters.sent_packets.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtp;

    #[test]
    fn reads_the_audio_level_in_place() {
        let mut pkt = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: AUDIO_PT,
                ..Default::default()
            },
            payload: vec![1, 2, 3].into(),
        };
        let plain = pkt.marshal().unwrap();
        assert_eq!(audio_level(&plain), None);
        pkt.header
            .set_extension(AUDIO_LEVEL_ID, vec![0x80 | 30].into())
            .unwrap();
        assert_eq!(audio_level(&pkt.marshal().unwrap()), Some(30));
        pkt.header
            .set_extension(AUDIO_LEVEL_ID, vec![127].into())
            .unwrap();
        assert_eq!(audio_level(&pkt.marshal().unwrap()), Some(127));
    }

    #[test]
    fn only_rtp_is_forwarded() {
        assert!(!is_rtp(HELLO));
        assert!(!is_rtp(BYE));
        assert!(is_rtp(&[0x80, 111]));
    }
}
