// Confer's meeting page (/m/{room}) and call widget (/call/{room}).
// Protocol: docs/signaling.md. Embedding: docs/embedding.md.

const match = location.pathname.match(/^\/(m|call)\/([A-Za-z0-9_-]{1,64})$/);
const mode = match && match[1] === 'call' ? 'call' : 'meeting';
const roomId = match ? match[2] : '';
document.body.classList.add(mode);

const $ = (id) => document.getElementById(id);
const grid = $('grid');
const statusEl = $('status');

// ---------------------------------------------------------------- host page
// The widget tells the page embedding it how the call goes.
let callState = null;
function notifyHost(event, extra = {}) {
  if (window.parent === window || callState === event) return;
  callState = event;
  window.parent.postMessage({ source: 'confer', event, room: roomId, ...extra }, '*');
}

function setStatus(text) { statusEl.textContent = text; }

function showBanner(text, kind = 'warn') {
  const b = $('banner');
  b.textContent = text;
  b.className = kind;
  b.hidden = !text;
}

// ---------------------------------------------------------------- token
// From the URL fragment (#token=…), from the host page (postMessage), or in
// demo mode from the server for a name (?name=… or asked here).
async function obtainToken() {
  const frag = new URLSearchParams(location.hash.slice(1));
  if (frag.get('token')) return frag.get('token');
  // Set by the demo page for the person who just scheduled this meeting.
  const stored = sessionStorage.getItem(`confer.token.${roomId}`);
  if (stored) return stored;
  const cfg = await fetch('/api/config').then((r) => r.json());
  if (!cfg.demo) {
    if (window.parent === window) throw new Error('This link has no join token. Open the meeting from your groupware server.');
    setStatus('Waiting for the chat window…');
    return new Promise((resolve) => {
      window.addEventListener('message', (e) => {
        if (e.source === window.parent && e.data && e.data.type === 'confer:token') resolve(String(e.data.token));
      });
      window.parent.postMessage({ source: 'confer', event: 'ready', room: roomId }, '*');
    });
  }
  let name = new URLSearchParams(location.search).get('name');
  if (!name) name = await askName();
  const res = await fetch('/api/demo/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ name, room: roomId, kind: mode }),
  });
  const body = await res.json();
  if (!res.ok) throw new Error(body.error ? body.error.message : `demo login failed (${res.status})`);
  return body.token;
}

function askName() {
  const form = $('name-form');
  const input = $('name-input');
  input.value = localStorage.getItem('confer.name') || '';
  form.hidden = false;
  setStatus('Who are you?');
  return new Promise((resolve) => {
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const name = input.value.trim();
      localStorage.setItem('confer.name', name);
      form.hidden = true;
      resolve(name);
    });
  });
}

// ---------------------------------------------------------------- tiles
const tiles = new Map(); // participant id -> { el, video, stream, name, audioMuted, videoMuted }
let selfId = null;

function tileFor(id, name, local = false) {
  let t = tiles.get(id);
  if (t) return t;
  const el = document.createElement('div');
  el.className = 'tile' + (local ? ' local' : ' remote');
  el.dataset.participant = id;
  const video = document.createElement('video');
  video.autoplay = true;
  video.playsInline = true;
  if (local) video.muted = true;
  const placeholder = document.createElement('div');
  placeholder.className = 'placeholder';
  placeholder.textContent = (name || '?').trim().charAt(0).toUpperCase();
  const label = document.createElement('div');
  label.className = 'label';
  el.append(video, placeholder, label);
  grid.append(el);
  t = { el, video, label, stream: new MediaStream(), name, audioMuted: false, videoMuted: false, quality: null, visible: true, paused: new Set() };
  video.srcObject = t.stream;
  tiles.set(id, t);
  if (!local) {
    sizes.observe(video);
    sights.observe(video);
  }
  renderTile(id);
  renderPeople();
  return t;
}

// ---------------------------------------------------------------- simulcast
// Cameras publish two or three sizes (simulcast); each remote tile asks the
// server for the one that fits the space it has on screen, so a grid of
// small tiles costs little bandwidth and decoding.
function qualityFor(t) {
  if (!t.visible) return 'off';
  const px = t.video.clientWidth * (window.devicePixelRatio || 1);
  if (px <= 360) return 'low';
  if (px <= 720) return 'medium';
  return 'high';
}

function askQuality(t, force = false) {
  const quality = qualityFor(t);
  if (!force && quality === t.quality) return;
  t.quality = quality;
  for (const track of t.stream.getVideoTracks()) send({ type: 'video_quality', track_id: serverId(track), quality });
}

const sizes = new ResizeObserver((entries) => {
  for (const e of entries) {
    const id = e.target.parentElement && e.target.parentElement.dataset.participant;
    const t = id && tiles.get(id);
    if (t) askQuality(t);
  }
});

// A tile out of sight (scrolled away in a large grid, or hidden) asks for no
// video at all until it shows again.
const sights = new IntersectionObserver((entries) => {
  for (const e of entries) {
    const id = e.target.parentElement && e.target.parentElement.dataset.participant;
    const t = id && tiles.get(id);
    if (!t) continue;
    t.visible = e.isIntersecting;
    askQuality(t);
  }
});

// Cameras publish simulcast unless the link says `?simulcast=0`.
const publishSimulcast = new URLSearchParams(location.search).get('simulcast') !== '0';
// Receive on a second connection the server offers (docs/signaling.md,
// "Downlink"), sent by the server's own media path, which costs it half as
// much; `?downlink=0` receives on the publishing connection instead.
const useDownlink = new URLSearchParams(location.search).get('downlink') !== '0';
// A downlink that never connected (a network or browser it does not suit):
// the page rejoins receiving on its one peer connection.
let downlinkFailed = false;
let downlinkWorked = false;
let onDownlink = false; // this join's choice

// Simulcast layers for a camera of this size: smallest first, named as the
// server expects (q, h, f). Below 960 pixels wide Chrome sends at most two.
function cameraEncodings(track) {
  const { width = 640 } = track.getSettings();
  if (width >= 960) {
    return [
      { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150000 },
      { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500000 },
      { rid: 'f', maxBitrate: 1500000 },
    ];
  }
  return [
    { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 250000 },
    { rid: 'f', maxBitrate: 900000 },
  ];
}

function renderTile(id) {
  const t = tiles.get(id);
  if (!t) return;
  t.label.textContent = id === selfId ? `${t.name} (you)` : t.name;
  const flags = [];
  if (t.audioMuted) flags.push('muted');
  if (t.videoMuted) flags.push('no video');
  else if (t.paused.size) flags.push('video paused: your connection is too slow');
  if (flags.length) {
    const span = document.createElement('span');
    span.className = 'flags';
    span.textContent = flags.join(', ');
    t.label.append(span);
  }
  // A video the server paused for bandwidth shows the placeholder, not a frozen picture.
  const live = t.stream.getVideoTracks().some((v) => v.readyState === 'live' && !t.paused.has(serverId(v)));
  t.el.classList.toggle('has-video', live && !t.videoMuted);
}

function removeTile(id) {
  const t = tiles.get(id);
  if (!t) return;
  t.video.srcObject = null;
  t.el.remove();
  tiles.delete(id);
  renderPeople();
}

function renderPeople() {
  const list = $('people-list');
  list.replaceChildren();
  for (const [id, t] of tiles) {
    const li = document.createElement('li');
    li.dataset.participant = id;
    const name = document.createElement('span');
    name.textContent = id === selfId ? `${t.name} (you)` : t.name;
    li.append(name);
    if (t.el.classList.contains('speaking')) li.className = 'speaking';
    // Moderator tools; the server checks the role again.
    if (myRole === 'moderator' && id !== selfId) {
      const mute = document.createElement('button');
      mute.className = 'mod-mute';
      mute.textContent = 'Mute';
      mute.disabled = t.audioMuted;
      mute.onclick = () => send({ type: 'mute_participant', participant_id: id, kind: 'audio' });
      const remove = document.createElement('button');
      remove.className = 'mod-remove';
      remove.textContent = 'Remove';
      remove.onclick = () => {
        if (confirm(`Remove ${t.name} from the meeting?`)) send({ type: 'remove_participant', participant_id: id });
      };
      li.append(mute, remove);
    }
    list.append(li);
  }
  $('count').textContent = String(tiles.size);
}

function setSpeaker(id) {
  for (const [pid, t] of tiles) t.el.classList.toggle('speaking', pid === id);
  renderPeople();
}

// ---------------------------------------------------------------- media
let localStream = null;
let cameraTrack = null;
let screenTrack = null;

async function openDevices() {
  const attempts = [
    { audio: true, video: { width: 640, height: 480 } },
    { audio: true, video: false },
    { audio: false, video: true },
  ];
  let lastError = null;
  for (const constraints of attempts) {
    try {
      const s = await navigator.mediaDevices.getUserMedia(constraints);
      if (!constraints.video) showBanner('No camera could be used: others will hear you but not see you.');
      if (!constraints.audio) showBanner('No microphone could be used: others will see you but not hear you.');
      return s;
    } catch (e) {
      lastError = e;
      if (e.name === 'NotAllowedError') break; // asking again will not help
    }
  }
  const denied = lastError && lastError.name === 'NotAllowedError';
  showBanner(denied
    ? 'Camera and microphone are blocked. Allow them in the browser\'s site settings and reload; until then you can watch and listen only.'
    : 'No camera or microphone was found. You can watch and listen only.', 'error');
  return new MediaStream();
}

// ---------------------------------------------------------------- call
let ws = null;
let pc = null;
let down = null; // the downlink, unless ?downlink=0
let token = null;
let leaving = false;
let retries = 0;
let makingOffer = false;
let pendingCandidates = [];
let everConnected = false;
let myRole = 'participant';

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

function connect() {
  setStatus(retries ? 'Reconnecting…' : 'Connecting…');
  ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`);
  onDownlink = useDownlink && !downlinkFailed;
  ws.onopen = () => send({ type: 'join', token, room: roomId, downlink: onDownlink });
  ws.onmessage = (e) => handle(JSON.parse(e.data)).catch((err) => console.error('confer:', err));
  ws.onclose = () => {
    closePeer();
    if (leaving) return;
    retries += 1;
    const delay = Math.min(10000, 500 * 2 ** Math.min(retries, 5));
    showBanner(`Connection lost. Reconnecting in ${Math.round(delay / 1000)} s…`, 'error');
    setStatus('Disconnected');
    setTimeout(connect, delay);
  };
}

function closePeer() {
  if (pc) pc.close();
  if (down) down.close();
  pc = null;
  down = null;
  pendingCandidates = [];
  for (const id of [...tiles.keys()]) if (id !== selfId) removeTile(id);
}

// Publish VP8 where the browser can: recordings keep the video as it was
// sent, in WebM, which holds VP8 but not H.264. Safari offers H.264 first,
// and the SFU answers in the offer's order.
function preferVp8(transceiver) {
  if (!transceiver.setCodecPreferences || !RTCRtpReceiver.getCapabilities) return;
  const codecs = (RTCRtpReceiver.getCapabilities('video') || {}).codecs || [];
  const isVp8 = (c) => c.mimeType.toLowerCase() === 'video/vp8';
  if (!codecs.some(isVp8)) return;
  try {
    transceiver.setCodecPreferences([...codecs.filter(isVp8), ...codecs.filter((c) => !isVp8(c))]);
  } catch (e) {
    console.warn('confer: keeping the browser\'s codec order', e);
  }
}

const DOWNLINK_CONNECT_MS = 8000;

// The downlink failed, or did not connect in time: rejoin, and if it never
// connected in this page, rejoin receiving on the peer connection.
function downlinkLost(link) {
  if (link !== down) return;
  if (!downlinkWorked) {
    console.warn('confer: the downlink did not connect; receiving on the peer connection');
    downlinkFailed = true;
  }
  showBanner('The media connection failed; reconnecting…', 'error');
  ws.close();
}

function newPeer(iceServers) {
  pc = new RTCPeerConnection({ iceServers, bundlePolicy: 'max-bundle' });
  for (const track of localStream.getTracks()) {
    const init = { direction: 'sendonly', streams: [localStream] };
    if (track.kind === 'video' && publishSimulcast) init.sendEncodings = cameraEncodings(track);
    const transceiver = pc.addTransceiver(track, init);
    if (track.kind === 'video') preferVp8(transceiver);
  }
  // Watch-only (no devices): still make the first offer, which the server waits for.
  if (!localStream.getTracks().length) pc.addTransceiver('audio', { direction: 'recvonly' });
  pc.onicecandidate = (e) => { if (e.candidate) send({ type: 'candidate', candidate: e.candidate.toJSON() }); };
  pc.onnegotiationneeded = async () => {
    try {
      makingOffer = true;
      await pc.setLocalDescription();
      send({ type: 'offer', sdp: pc.localDescription.sdp });
    } catch (err) {
      console.error('confer: offer failed', err);
    } finally {
      makingOffer = false;
    }
  };
  pc.ontrack = onTrack;
  if (onDownlink) {
    // The same STUN/TURN servers: a client that reaches the server only
    // through a relay needs one for its downlink too.
    const link = new RTCPeerConnection({ iceServers, bundlePolicy: 'max-bundle' });
    link.ontrack = onTrack;
    link.onconnectionstatechange = () => {
      if (link.connectionState === 'connected') downlinkWorked = true;
      if (link.connectionState === 'failed') downlinkLost(link);
    };
    down = link;
  }
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === 'connected') {
      setStatus(mode === 'call' && tiles.size < 2 ? 'Waiting for the other person…' : 'Connected');
      retries = 0;
      showBanner('');
    } else if (pc.connectionState === 'failed') {
      showBanner('The media connection failed; reconnecting…', 'error');
      ws.close();
    }
  };
}

// The server's id of each received track, from the msid of its section:
// Firefox (as the standard now says) gives a received track an id of its
// own, so `track.id` cannot name it to the server.
const serverIds = new WeakMap();
const serverId = (track) => serverIds.get(track) || track.id;

function msidTrack(pc, mid) {
  const sdp = (pc.remoteDescription && pc.remoteDescription.sdp) || '';
  const section = sdp.split('\r\nm=').find((s) => s.includes(`\r\na=mid:${mid}\r\n`));
  const m = section && section.match(/\r\na=msid:\S+ (\S+)/);
  return m && m[1];
}

function onTrack(e) {
  // The server names each forwarded stream after its publisher.
  const owner = e.streams[0] && e.streams[0].id;
  if (!owner || !tiles.has(owner) || owner === selfId) return;
  const id = msidTrack(e.target, e.transceiver.mid);
  if (id) serverIds.set(e.track, id);
  const t = tileFor(owner, '…');
  t.stream.addTrack(e.track);
  if (e.track.kind === 'video') askQuality(t, true);
  e.track.onunmute = () => renderTile(owner);
  e.track.onended = () => { t.stream.removeTrack(e.track); t.paused.delete(serverId(e.track)); renderTile(owner); };
  renderTile(owner);
  t.video.play().catch(() => {});
}

async function handle(msg) {
  switch (msg.type) {
    case 'joined': {
      if (selfId && selfId !== msg.participant_id) removeTile(selfId); // rejoined after a drop
      selfId = msg.participant_id;
      myRole = msg.role;
      $('end-meeting').hidden = myRole !== 'moderator' || mode === 'call';
      if (msg.meeting && msg.meeting.title) $('room-name').textContent = msg.meeting.title;
      setRecording(Boolean(msg.recording));
      $('record').hidden = myRole !== 'moderator' || mode === 'call';
      $('recordings-link').href = `/r/${roomId}#token=${encodeURIComponent(token)}`;
      $('recordings-link').hidden = mode === 'call';
      const me = tileFor(selfId, msg.name, true);
      me.stream = localStream;
      me.video.srcObject = localStream;
      renderTile(selfId);
      for (const p of msg.participants) addParticipant(p);
      newPeer(msg.ice_servers);
      $('controls').hidden = false;
      updatePresence();
      break;
    }
    case 'offer': {
      // Polite peer: the server's offer wins a collision; ours is rolled back.
      await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      await flushCandidates();
      await pc.setLocalDescription();
      send({ type: 'answer', sdp: pc.localDescription.sdp });
      break;
    }
    case 'downlink_offer': {
      // ICE-lite: the offer names the server's candidate; no trickling.
      const link = down;
      // A browser may keep checking for half a minute before it calls a
      // connection failed; a first downlink gets a few seconds.
      if (link.signalingState === 'stable' && !link.remoteDescription) {
        setTimeout(() => { if (link.connectionState !== 'connected') downlinkLost(link); }, DOWNLINK_CONNECT_MS);
      }
      await down.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      await down.setLocalDescription();
      send({ type: 'downlink_answer', sdp: down.localDescription.sdp });
      break;
    }
    case 'answer':
      if (pc.signalingState === 'have-local-offer') {
        await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
        await flushCandidates();
      }
      break;
    case 'candidate':
      if (pc && pc.remoteDescription) await pc.addIceCandidate(msg.candidate).catch(() => {});
      else pendingCandidates.push(msg.candidate);
      break;
    case 'participant_joined':
      addParticipant(msg.participant);
      updatePresence();
      break;
    case 'participant_left':
      removeTile(msg.participant_id);
      updatePresence();
      break;
    case 'mute': {
      const t = tiles.get(msg.participant_id);
      if (t) {
        if (msg.kind === 'audio') t.audioMuted = msg.muted; else t.videoMuted = msg.muted;
        renderTile(msg.participant_id);
        renderPeople();
      }
      break;
    }
    case 'video_paused':
      for (const [pid, t] of tiles) {
        if (!t.stream.getVideoTracks().some((v) => serverId(v) === msg.track_id)) continue;
        if (msg.paused) t.paused.add(msg.track_id); else t.paused.delete(msg.track_id);
        renderTile(pid);
      }
      break;
    case 'muted_by_moderator': {
      const track = localStream.getAudioTracks()[0];
      if (track && track.enabled) setMicMuted(true, false);
      showBanner('A moderator muted your microphone. You can unmute yourself when you need to speak.');
      break;
    }
    case 'recording':
      if (msg.state === 'started') { setRecording(true); showBanner('This meeting is now being recorded.'); }
      if (msg.state === 'stopped') {
        setRecording(false);
        const why = msg.reason ? ` (${msg.reason})` : '';
        showBanner(`Recording stopped${why}. It will be in the recordings list shortly.`);
      }
      if (msg.state === 'available') showBanner('The recording is ready in the recordings list.');
      if (msg.state === 'failed') {
        setRecording(false);
        const why = msg.reason ? ` (${msg.reason})` : '';
        showBanner(`The recording could not be saved${why}.`, 'error');
      }
      break;
    case 'meeting_ending': {
      const at = new Date(msg.closes_at);
      showBanner(`This meeting's time is over; it closes at ${at.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })}.`);
      break;
    }
    case 'active_speaker':
      setSpeaker(msg.participant_id);
      break;
    case 'removed': {
      leaving = true;
      const reasons = {
        meeting_ended: 'The meeting\'s scheduled time is over.',
        ended_by_moderator: 'A moderator ended the meeting for everyone.',
        removed_by_moderator: 'A moderator removed you from the meeting.',
      };
      showBanner(reasons[msg.reason] || `You were removed from the meeting: ${msg.reason}.`, 'error');
      end();
      break;
    }
    case 'error':
      handleError(msg);
      break;
    default:
      break; // newer servers may send more; ignoring them is safe
  }
}

function handleError(msg) {
  // Refusals at join: shown, and no reconnecting (it would be refused again).
  // Schedule refusals carry times and names in the server's message.
  const texts = {
    token_invalid: 'Your invitation link is not valid.',
    token_expired: 'Your invitation link has expired. Open the meeting again from your groupware server.',
    wrong_room: 'Your invitation is for a different meeting.',
    room_full: 'This meeting is full.',
    room_closed: 'This meeting has ended.',
    meeting_not_found: 'There is no meeting scheduled at this address.',
    meeting_not_started: null,
    meeting_ended: null,
    meeting_cancelled: 'This meeting has been cancelled.',
    not_invited: 'You are not on this meeting\'s invitation list. Ask the organizer to invite you.',
    home_server_unreachable: 'The meeting could not be checked because the groupware server cannot be reached right now. Please try again in a minute.',
    home_server_error: null,
  };
  if (msg.code === 'forbidden') {
    showBanner('Only moderators can do that.');
  } else if (msg.code === 'recording_spool_full' || msg.code === 'recording_disabled') {
    showBanner(`Cannot record: ${msg.message}`, 'error');
  } else if (msg.code === 'meeting_not_started') {
    const when = msg.message.match(/from (.+)$/);
    const at = when ? new Date(when[1].replace(' UTC', 'Z').replace(' ', 'T')) : null;
    leaving = true;
    showBanner(at && !isNaN(at) ? `This meeting has not started yet. You can join from ${at.toLocaleString()}.` : msg.message, 'error');
    end();
  } else if (msg.code === 'sfu_unavailable') {
    // Split deployments: the room's media server is gone; closing
    // reconnects after a back-off, and the room opens on another.
    showBanner('The media server is unavailable. Retrying…', 'error');
    ws.close();
  } else if (msg.code in texts) {
    leaving = true;
    showBanner(texts[msg.code] || `Cannot join: ${msg.message}`, 'error');
    end();
  } else {
    console.warn('confer: server error', msg.code, msg.message);
  }
}

async function flushCandidates() {
  const list = pendingCandidates;
  pendingCandidates = [];
  for (const c of list) await pc.addIceCandidate(c).catch(() => {});
}

function addParticipant(p) {
  const t = tileFor(p.id, p.name);
  t.name = p.name;
  t.audioMuted = p.audio_muted;
  t.videoMuted = p.video_muted;
  t.el.querySelector('.placeholder').textContent = p.name.trim().charAt(0).toUpperCase();
  renderTile(p.id);
  renderPeople();
}

function updatePresence() {
  const others = tiles.size - 1;
  if (others > 0) {
    everConnected = true;
    notifyHost('connected', { participants: others + 1 });
    setStatus('Connected');
  } else if (everConnected && mode === 'call') {
    notifyHost('ended', { reason: 'the other person left' });
    setStatus('Call ended');
  } else {
    notifyHost('ringing');
    setStatus(mode === 'call' ? 'Ringing…' : 'Waiting for others to join…');
  }
}

function end() {
  leaving = true;
  if (ws) ws.close();
  closePeer();
  if (localStream) for (const t of localStream.getTracks()) t.stop();
  if (screenTrack) screenTrack.stop();
  $('controls').hidden = true;
  setStatus('Left the meeting');
  notifyHost('ended');
}

// ---------------------------------------------------------------- controls
function wireControls() {
  $('mic').onclick = () => {
    const track = localStream.getAudioTracks()[0];
    if (track) setMicMuted(track.enabled, true);
  };
  $('record').onclick = () => send({ type: recordingOn ? 'stop_recording' : 'start_recording' });
  $('end-meeting').onclick = () => {
    if (confirm('End the meeting for everyone?')) send({ type: 'end_meeting' });
  };
  $('cam').onclick = () => {
    if (!cameraTrack) return;
    cameraTrack.enabled = !cameraTrack.enabled;
    $('cam').setAttribute('aria-pressed', String(!cameraTrack.enabled));
    $('cam').textContent = cameraTrack.enabled ? 'Stop video' : 'Start video';
    send({ type: 'mute', kind: 'video', muted: !cameraTrack.enabled });
    tiles.get(selfId).videoMuted = !cameraTrack.enabled;
    renderTile(selfId);
  };
  $('share').onclick = async () => {
    const sender = pc && pc.getSenders().find((s) => s.track && s.track.kind === 'video');
    if (screenTrack) return stopSharing(sender);
    if (!sender) { showBanner('Screen sharing needs a camera track to replace.'); return; }
    try {
      const display = await navigator.mediaDevices.getDisplayMedia({ video: true });
      screenTrack = display.getVideoTracks()[0];
      await sender.replaceTrack(screenTrack);
      screenTrack.onended = () => stopSharing(sender);
      $('share').setAttribute('aria-pressed', 'true');
      $('share').textContent = 'Stop sharing';
    } catch (e) {
      if (e.name !== 'NotAllowedError') showBanner(`Screen sharing failed: ${e.message}`);
    }
  };
  $('people-toggle').onclick = () => {
    const p = $('people');
    p.hidden = !p.hidden;
    $('people-toggle').setAttribute('aria-pressed', String(!p.hidden));
  };
  $('leave').onclick = () => {
    send({ type: 'leave' });
    end();
  };
}

let recordingOn = false;
function setRecording(on) {
  recordingOn = on;
  $('rec').hidden = !on;
  $('record').textContent = on ? 'Stop recording' : 'Record';
  $('record').setAttribute('aria-pressed', String(on));
}

// `tell`: false when the server already knows (a moderator muted us).
function setMicMuted(muted, tell) {
  const track = localStream.getAudioTracks()[0];
  if (!track) return;
  track.enabled = !muted;
  $('mic').setAttribute('aria-pressed', String(muted));
  $('mic').textContent = muted ? 'Unmute' : 'Mute';
  if (tell) send({ type: 'mute', kind: 'audio', muted });
  if (tiles.has(selfId)) {
    tiles.get(selfId).audioMuted = muted;
    renderTile(selfId);
  }
}

async function stopSharing(sender) {
  if (!screenTrack) return;
  screenTrack.stop();
  screenTrack = null;
  if (sender) await sender.replaceTrack(cameraTrack);
  $('share').setAttribute('aria-pressed', 'false');
  $('share').textContent = 'Share screen';
}

async function main() {
  if (!match) { showBanner('This is not a meeting address.', 'error'); return; }
  $('room-name').textContent = roomId;
  try {
    token = await obtainToken();
  } catch (e) {
    showBanner(e.message, 'error');
    setStatus('Cannot join');
    return;
  }
  localStream = await openDevices();
  cameraTrack = localStream.getVideoTracks()[0] || null;
  wireControls();
  connect();
}

// Diagnostics for the browser console and tests: the live peer connection.
window.confer = {
  get pc() { return pc; },
  get downlink() { return down; },
  get participantId() { return selfId; },
  get role() { return myRole; },
  get recording() { return recordingOn; },
  get micMuted() { const t = localStream && localStream.getAudioTracks()[0]; return !!t && !t.enabled; },
};

main();
