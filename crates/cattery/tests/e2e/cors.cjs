// Cross-origin calls from a real browser: Debian's chromium, headless, driven by playwright-core.
// Run by the e2e test `web::browser_cross_origin_start` (web.rs). This script serves a page on
// another loopback port (so another origin), and from that page calls Cattery with fetch():
// the public start with a public key (must work: preflight and call), and a private route with
// a private key (must be refused by the browser). Prints one JSON line with what happened.
// Environment: CATTERY_URL, CATTERY_PK, CATTERY_SK, CATTERY_AGENT, NODE_PATH (where
// playwright-core is installed), CATTERY_CHROMIUM (default /usr/bin/chromium).
'use strict';

const { env, launch } = require('./browser.cjs');
const http = require('http');

const BASE = env('CATTERY_URL');
const PK = env('CATTERY_PK');
const SK = env('CATTERY_SK');
const AGENT = env('CATTERY_AGENT');

async function main() {
  const page_server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end('<!doctype html><title>cors</title><p>another origin</p>');
  });
  await new Promise((r) => page_server.listen(0, '127.0.0.1', r));
  const origin = `http://127.0.0.1:${page_server.address().port}`;
  const browser = await launch();
  try {
    const page = await browser.newPage();
    await page.goto(origin + '/');
    const out = await page.evaluate(async ({ BASE, PK, SK, AGENT }) => {
      const r = { origin: location.origin };
      try {
        // Content-Type JSON and Authorization make this a preflighted request.
        const resp = await fetch(`${BASE}/v1/public/${AGENT}/start`, {
          method: 'POST',
          headers: { 'Authorization': `Bearer ${PK}`, 'Content-Type': 'application/json' },
          body: JSON.stringify({ body: { from: 'browser' } }),
        });
        r.start = { status: resp.status, body: await resp.json() };
      } catch (e) {
        r.start = { error: String(e) };
      }
      try {
        const resp = await fetch(`${BASE}/v1/agents`, { headers: { 'Authorization': `Bearer ${SK}` } });
        r.private = { status: resp.status };
      } catch (e) {
        r.private = { error: String(e) };
      }
      return r;
    }, { BASE, PK, SK, AGENT });
    console.log(JSON.stringify(out));
  } finally {
    await browser.close();
    page_server.close();
  }
}

main().catch((e) => { console.error(e); process.exit(1); });
