// Firefox (Debian's firefox-esr, driven by Puppeteer over WebDriver BiDi)
// in meetings with Chromium, against a real `confer serve` on 127.0.0.1:
// the two engines publish, simulcast and answer offers differently.
//
// Run it through ./in-netns: Firefox does not pair with a server on
// loopback. TEST_CONFER_BIN names the confer binary; FIREFOX may name the
// browser.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import puppeteer from 'puppeteer-core';
import { assertMediaFlowing, joinToken, launchChromium, startConfer, waitFor } from './harness.mjs';

const secret = randomBytes(16).toString('hex');
let server;
let chromium;

before(async () => {
  assert.ok(process.env.TEST_IN_NETNS, 'run this file through tests/browser/in-netns');
  server = await startConfer({ CONFER_AUTH_TOKEN_SECRET: secret });
  chromium = await launchChromium();
});

// Each Firefox page in a browser of its own, as on its own machine: a
// background tab would not paint its videos.
function launchFirefox() {
  return puppeteer.launch({
    browser: 'firefox',
    executablePath: process.env.FIREFOX || '/usr/bin/firefox-esr',
    headless: true,
    extraPrefsFirefox: {
      // A fake camera and microphone, no permission prompt.
      'media.navigator.streams.fake': true,
      'media.navigator.permission.disabled': true,
      // Remote media plays with sound without a click.
      'media.autoplay.default': 0,
      // The server is on 127.0.0.1: gather loopback candidates, unobfuscated.
      'media.peerconnection.ice.loopback': true,
      'media.peerconnection.ice.obfuscate_host_addresses': false,
    },
  });
}

after(async () => {
  if (chromium) await chromium.close();
  if (server) server.proc.kill('SIGTERM');
});

function token(room, name, role = 'participant') {
  return joinToken(secret, {
    sub: `u-${name}`, name, room, role, kind: 'call', exp: Math.floor(Date.now() / 1000) + 600,
  });
}

function meetingUrl(room, name, query, role) {
  return `${server.url}/m/${room}${query}#token=${token(room, name, role)}`;
}

async function openChromium(url) {
  const ctx = await chromium.newContext();
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error('[chromium] page error:', e.message));
  await page.goto(url);
  return { page, close: () => ctx.close() };
}

async function openFirefox(url) {
  const firefox = await launchFirefox();
  const [page] = await firefox.pages();
  page.on('pageerror', (e) => console.error('[firefox] page error:', e.message));
  await page.goto(url);
  return { page, close: () => firefox.close() };
}

async function meetAcrossBrowsers(query, receiving) {
  const room = `ff-${randomBytes(4).toString('hex')}`;
  const people = [
    ['Ana (Chromium)', await openChromium(meetingUrl(room, 'Ana', query))],
    ['Bo (Firefox)', await openFirefox(meetingUrl(room, 'Bo', query))],
    ['Cy (Firefox)', await openFirefox(meetingUrl(room, 'Cy', query))],
  ];
  try {
    for (const [label, { page }] of people) await assertMediaFlowing(page, 2, label);
    // Firefox really is the one publishing and receiving there, on the
    // connection the test is about.
    const agent = await people[1][1].page.evaluate(() => navigator.userAgent);
    assert.match(agent, /Firefox\//);
    for (const [label, { page }] of people) {
      const on = await page.evaluate(() => (window.confer.downlink ? 'downlink' : 'peer connection'));
      assert.equal(on, receiving, label);
    }
    // One Firefox leaves; the others carry on with each other.
    await people[2][1].close();
    for (const [label, { page }] of people.slice(0, 2)) {
      await waitFor(`${label}: the tile of the one who left to go`, 15000, async () =>
        page.evaluate(() => document.querySelectorAll('.tile.remote').length === 1));
      await assertMediaFlowing(page, 1, `${label}, after Cy left`);
    }
    // Another Firefox comes; on downlinks it takes over Cy's idle sections.
    people.push(['Di (Firefox)', await openFirefox(meetingUrl(room, 'Di', query))]);
    for (const [label, { page }] of [people[0], people[1], people[3]]) {
      await assertMediaFlowing(page, 2, `${label}, with Di`);
    }
  } finally {
    for (const [, p] of people) await p.close().catch(() => {});
  }
}

test('Chromium and two Firefoxes meet on downlinks; one leaves, another comes', async () => {
  await meetAcrossBrowsers('', 'downlink');
});

test('Chromium and two Firefoxes meet on peer connections (?downlink=0); one leaves, another comes', async () => {
  await meetAcrossBrowsers('?downlink=0', 'peer connection');
});

// The widths of the videos a page decodes (on its downlink, or its peer
// connection), and the frames decoded in all.
function decoding(page) {
  return page.evaluate(async () => {
    const out = { widths: [], frames: 0 };
    for (const pc of [window.confer.downlink, window.confer.pc]) {
      if (!pc) continue;
      (await pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video' && s.framesDecoded) {
          out.widths.push(s.frameWidth || 0);
          out.frames += s.framesDecoded;
        }
      });
    }
    return out;
  });
}

// Sets the width of every remote tile of `page` (to which the web client
// fits the simulcast layer it asks for), then waits until the one remote
// video decodes `width` pixels wide, and keeps decoding.
async function tilesDecodeAt(page, label, px, width) {
  await page.evaluate((w) => {
    for (const v of document.querySelectorAll('.tile.remote video')) {
      v.parentElement.style.width = `${w}px`;
      v.style.width = `${w}px`;
    }
  }, px);
  await waitFor(`${label} decoding ${width} px wide in ${px} px tiles`, 30000, async () => {
    const d = await decoding(page);
    return d.widths.length === 1 && d.widths[0] === width;
  });
  // And keeps decoding at that width: ten more frames (on a starved CI
  // machine a browser decoded 4 in 2 s once, so give it time).
  const before = (await decoding(page)).frames;
  await waitFor(`${label}: ten more frames ${width} px wide (from ${before})`, 15000, async () => {
    const d = await decoding(page);
    assert.deepEqual(d.widths, [width], label);
    return d.frames > before + 10;
  });
}

test('simulcast both ways: tile sizes choose the layer of a Chromium and of a Firefox camera', async () => {
  const room = `ff-${randomBytes(4).toString('hex')}`;
  const ana = await openChromium(meetingUrl(room, 'Ana', ''));
  const bo = await openFirefox(meetingUrl(room, 'Bo', ''));
  try {
    await assertMediaFlowing(bo.page, 1, 'Bo (Firefox)');
    await assertMediaFlowing(ana.page, 1, 'Ana (Chromium)');
    // Both 640×480 cameras go out as 320×240 and 640×480 layers. Bo asks
    // by the server's track id, which Firefox does not give its tracks.
    for (const [px, width] of [[200, 320], [800, 640], [200, 320]]) {
      await tilesDecodeAt(bo.page, 'Bo (Firefox) viewing Chromium', px, width);
      await tilesDecodeAt(ana.page, 'Ana (Chromium) viewing Firefox', px, width);
    }
  } finally {
    await bo.close().catch(() => {});
    await ana.close().catch(() => {});
  }
});

test('a Firefox moderator records a meeting with Chromium; the file has both streams', async () => {
  const room = `ff-rec-${randomBytes(4).toString('hex')}`;
  const bo = await openFirefox(meetingUrl(room, 'Bo', '', 'moderator'));
  const ana = await openChromium(meetingUrl(room, 'Ana', ''));
  try {
    await assertMediaFlowing(bo.page, 1, 'Bo (Firefox)');
    await assertMediaFlowing(ana.page, 1, 'Ana (Chromium)');
    const banner = (page) => page.evaluate(() => document.getElementById('banner').textContent);
    const recVisible = (page) => page.evaluate(() => {
      const rec = document.getElementById('rec');
      return !!rec && !rec.hidden && getComputedStyle(rec).display !== 'none';
    });
    await bo.page.click('#record');
    await waitFor('the REC indicator in Firefox', 10000, async () => recVisible(bo.page));
    await new Promise((r) => setTimeout(r, 6000));
    await bo.page.click('#record');
    await waitFor('the recording to be ready', 30000, async () => /recording is ready/.test(await banner(bo.page)));

    const auth = { Authorization: `Bearer ${token(room, 'Ana')}` };
    const [rec] = await waitFor('the recording listed', 10000, async () => {
      const body = await (await fetch(`${server.url}/api/rooms/${room}/recordings`, { headers: auth })).json();
      return body.recordings && body.recordings.length === 1 && body.recordings;
    });
    assert.ok(rec.duration_ms >= 4000, `only ${rec.duration_ms} ms recorded`);
    const file = await fetch(server.url + rec.download_url);
    assert.equal(file.status, 200);
    const path = join(mkdtempSync(join(tmpdir(), 'confer-ff-rec-')), 'meeting.webm');
    writeFileSync(path, Buffer.from(await file.arrayBuffer()));
    const streams = execFileSync('ffprobe', ['-v', 'error', '-show_entries', 'stream=codec_name',
      '-of', 'csv=p=0', path]).toString().trim().split('\n').sort();
    assert.deepEqual(streams, ['opus', 'vp8']);
    // It decodes to its end.
    execFileSync('ffmpeg', ['-v', 'error', '-xerror', '-i', path, '-f', 'null', '-']);
  } finally {
    await bo.close().catch(() => {});
    await ana.close().catch(() => {});
  }
});
