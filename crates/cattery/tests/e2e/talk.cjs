// "Talk to a bot" in a real browser: Debian's chromium, headless, with a fake microphone
// (`--use-fake-device-for-media-stream --use-fake-ui-for-media-stream`), driven by
// playwright-core. Run by the e2e test `dashboard::talk_to_a_webrtc_bot_in_a_browser`
// (dashboard.rs), which deploys the SmallWebRTC echo example (examples/webrtc-echo).
// The page starts a `webrtc` session with Pipecat's client (talk.js), negotiates through the
// session proxy, and reports the call's state and the bot's audio (inbound-rtp stats).
// This script prints `SESSION <id>` once the call is connected and audio came back, then
// `PACKETS <n> LEVEL <x>`, hangs up, and prints `ENDED`.
// First it checks that the sessions page marks CATTERY_WAITING_SESSION (a websocket session
// whose client never connected) as waiting for its client.
// Environment: CATTERY_URL, CATTERY_SK, CATTERY_AGENT, CATTERY_WAITING_SESSION,
// CATTERY_SCREENSHOTS, NODE_PATH,
// CATTERY_CHROMIUM (default /usr/bin/chromium).
'use strict';

const { env, launch } = require('./browser.cjs');
const path = require('path');

const BASE = env('CATTERY_URL');
const SK = env('CATTERY_SK');
const AGENT = env('CATTERY_AGENT');
const SHOTS = env('CATTERY_SCREENSHOTS');
const WAITING = env('CATTERY_WAITING_SESSION');
function step(msg) { console.error(`[talk e2e] ${msg}`); }
function check(cond, msg) { if (!cond) throw new Error(`check failed: ${msg}`); }

async function main() {
  const browser = await launch(['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    '--autoplay-policy=no-user-gesture-required']);
  const context = await browser.newContext({ viewport: { width: 1360, height: 760 } });
  const page = await context.newPage();
  const problems = [];
  const external = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  page.on('request', (r) => { if (!r.url().startsWith(BASE)) external.push(r.url()); });
  const shot = (name) => page.screenshot({ path: path.join(SHOTS, name), fullPage: true });
  const T = { timeout: 60000 };
  try {
    step('sign in');
    await page.goto(BASE + '/dashboard');
    await page.fill('#signin-key', SK);
    await page.click('#signin-button');
    await page.locator(`tr[data-agent="${AGENT}"] a.talk`).waitFor(T);

    step('a websocket session announced by /start shows as waiting for its client');
    await page.goto(`${BASE}/dashboard#/sessions?agent=${encodeURIComponent(AGENT)}`);
    await page.locator(`tr[data-session="${WAITING}"] .waiting`).waitFor(T);
    await shot('07-sessions-waiting-client.png');
    await page.goto(`${BASE}/dashboard#/agents`);
    await page.locator(`tr[data-agent="${AGENT}"] a.talk`).waitFor(T);

    step('Talk: a webrtc session, the fake microphone, the session proxy');
    await page.click(`tr[data-agent="${AGENT}"] a.talk`);
    await page.locator('#talk-start').waitFor(T);
    await page.click('#talk-start');
    await page.locator('#talk-state[data-connected="yes"]').waitFor(T);
    await page.locator('#talk-session a').waitFor(T);
    const sid = (await page.locator('#talk-session a').textContent()).trim();
    step('audio frames from the bot (inbound-rtp)');
    await page.waitForFunction(() => {
      const s = document.getElementById('talk-stats').dataset;
      return Number(s.packets) >= 100 && Number(s.samples) > 0 && Number(s.level) > 0;
    }, null, T);
    const stats = await page.locator('#talk-stats').evaluate((e) => ({ ...e.dataset }));
    await shot('06-talk-connected.png');
    console.log(`SESSION ${sid}`);
    console.log(`PACKETS ${stats.packets} LEVEL ${stats.level}`);
    check(await page.locator('#talk-audio').evaluate((a) => a.srcObject instanceof MediaStream), 'the bot audio plays');

    step('hang up');
    await page.click('#talk-hangup');
    await page.locator('#talk-state[data-state="ended"]').waitFor(T);
    check(problems.length === 0, `no script errors: ${problems.join('; ')}`);
    check(external.length === 0, `nothing loaded from elsewhere: ${external.join(', ')}`);
    console.log('ENDED');
  } catch (e) {
    await shot('06-talk-failed.png').catch(() => {});
    step(`page text: ${(await page.locator('main').innerText().catch(() => '')).slice(0, 800)}`);
    throw e;
  } finally {
    await browser.close();
  }
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1); });
