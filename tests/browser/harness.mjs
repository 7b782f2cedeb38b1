// What the browser tests share: starting confer, waiting, and checking
// that media flows into a page (Playwright's or Puppeteer's: both have
// `evaluate`).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const BIN = process.env.TEST_CONFER_BIN;

// The servers' latest log lines, for the message of a test that fails.
export const serverLog = [];
export function keepLog(proc, name) {
  let partial = '';
  proc.stdout.on('data', (d) => {
    if (process.env.SHOW_CONFER_LOG) process.stderr.write(d);
    const lines = (partial + d).split('\n');
    partial = lines.pop();
    // Without colours, and without the SRTP start-up noise.
    for (const l of lines) {
      const plain = l.replace(/\x1b\[[0-9;]*m/g, '');
      if (!plain.includes('local_srtp_context')) serverLog.push(`${name}: ${plain}`);
    }
    serverLog.splice(0, Math.max(0, serverLog.length - 40));
  });
}

// `role` is serve, signaling or sfu.
export async function startConfer(extraEnv = {}, dataDir = mkdtempSync(join(tmpdir(), 'confer-browser-')), role = 'serve') {
  assert.ok(BIN, 'set TEST_CONFER_BIN to the confer binary');
  const proc = spawn(BIN, [role, '--listen', '127.0.0.1:0', '--data-dir', dataDir], {
    env: { ...process.env, CONFER_SFU_UDP_PORT: '0', ...extraEnv },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  keepLog(proc, role === 'serve' ? 'confer' : role);
  const url = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`confer did not start: ${out}`)), 20000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/confer (?:sfu )?listening on (http:\/\/[^/\s]+)\//);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => reject(new Error(`confer exited with ${code}: ${out}`)));
  });
  return { proc, url };
}

// Decoded frames of every remote <video>, in tile order.
export function remoteFrames(frame) {
  // Firefox counts no frames of a MediaStream there, only in mozPaintedFrames.
  return frame.evaluate(() => [...document.querySelectorAll('.tile.remote video')]
    .map((v) => v.getVideoPlaybackQuality().totalVideoFrames || v.mozPaintedFrames || 0));
}

export async function audioPacketsReceived(frame) {
  return frame.evaluate(async () => {
    let n = 0;
    // On the peer connection, or on the downlink (?downlink=1).
    for (const pc of [window.confer && window.confer.pc, window.confer && window.confer.downlink]) {
      if (!pc) continue;
      (await pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'audio') n += s.packetsReceived; });
    }
    return n;
  });
}

export async function waitFor(what, timeoutMs, fn) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})\n`
    + `servers' latest log lines:\n${serverLog.join('\n')}`);
}

// Every remote video decodes frames, and keeps decoding; audio packets keep coming.
export async function assertMediaFlowing(frame, remotes, label) {
  // Audio may start a moment after video (its transceiver can come in a
  // later offer, and silence is not forwarded): wait for both to start.
  await waitFor(`${label}: ${remotes} remote videos with frames, and audio`, 30000, async () => {
    const f = await remoteFrames(frame);
    return f.length === remotes && f.every((n) => n > 0) && (await audioPacketsReceived(frame)) > 0;
  });
  const f1 = await remoteFrames(frame);
  const a1 = await audioPacketsReceived(frame);
  await new Promise((r) => setTimeout(r, 2000));
  const f2 = await remoteFrames(frame);
  const a2 = await audioPacketsReceived(frame);
  assert.equal(f2.length, remotes, `${label}: remote video count`);
  f2.forEach((n, i) => assert.ok(n > f1[i] + 10, `${label}: video ${i} frames rose only ${f1[i]} → ${n}`));
  assert.ok(a2 > a1 + 50, `${label}: audio packets rose only ${a1} → ${a2}`);
}

// An HS256 join token, as a home server signs it (docs/home-server.md).
export function joinToken(secret, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

// Debian's Chromium with a fake camera and microphone, through Playwright.
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
    ],
  });
}
