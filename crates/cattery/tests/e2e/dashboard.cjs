// The dashboard in a real browser: Debian's chromium, headless, driven by playwright-core.
// Run by the e2e test `dashboard::dashboard_in_a_browser` (dashboard.rs), which starts the
// server, deploys the agents, and checks processes by pid; the two talk over stdio:
//   this script prints `SESSION <id>` once the session it started is open, and waits for a
//   line `go`; it prints `STOPPED <id>` once the page shows it terminated, and waits again.
// Environment: CATTERY_URL, CATTERY_SK (org "default"), CATTERY_OTHER_SK (org "other"),
// CATTERY_AGENT, CATTERY_OTHER_AGENT, CATTERY_DELETED_AGENT and CATTERY_DELETED_SESSION (an
// agent deleted after one session), CATTERY_LEFT_NODE (a node of this store that left),
// CATTERY_COMMIT (the commit the server was built from, as its Nodes page shows it; empty
// when unknown),
// CATTERY_SCREENSHOTS (a directory), NODE_PATH (where
// playwright-core is installed), CATTERY_CHROMIUM (default /usr/bin/chromium).
'use strict';

const { env, launch } = require('./browser.cjs');
const path = require('path');
const readline = require('readline');

const BASE = env('CATTERY_URL');
const SK = env('CATTERY_SK');
const OTHER_SK = env('CATTERY_OTHER_SK');
const AGENT = env('CATTERY_AGENT');
const OTHER_AGENT = env('CATTERY_OTHER_AGENT');
const SHOTS = env('CATTERY_SCREENSHOTS');
const DELETED_AGENT = env('CATTERY_DELETED_AGENT');
const DELETED_SESSION = env('CATTERY_DELETED_SESSION');
const LEFT_NODE = env('CATTERY_LEFT_NODE');
const COMMIT = process.env.CATTERY_COMMIT || '';

const lines = readline.createInterface({ input: process.stdin });
const waiting = [];
lines.on('line', (l) => { const w = waiting.shift(); if (w) w(l.trim()); });
const nextLine = () => new Promise((res) => waiting.push(res));
function step(msg) { console.error(`[dashboard e2e] ${msg}`); }
function check(cond, msg) { if (!cond) throw new Error(`check failed: ${msg}`); }

async function main() {
  const browser = await launch();
  const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`); });
  page.on('dialog', (d) => { step(`confirm: ${d.message()}`); d.accept(); });
  const shot = (name) => page.screenshot({ path: path.join(SHOTS, name), fullPage: true });
  const T = { timeout: 30000 };

  try {
    step('/ redirects to the sign-in page');
    await page.goto(BASE + '/');
    check(page.url() === BASE + '/dashboard', `landed on ${page.url()}`);
    await page.locator('#signin').waitFor({ state: 'visible', ...T });

    step('a wrong key is refused');
    await page.fill('#signin-key', 'pk_not_a_real_key_0000');
    await page.click('#signin-button');
    await page.locator('#signin-error', { hasText: 'refused' }).waitFor(T);
    check(await page.locator('#app').isHidden(), 'the app is hidden after a refused key');
    await shot('01-signin-refused.png');

    step('sign in with the private key');
    await page.fill('#signin-key', SK);
    await page.click('#signin-button');
    await page.locator('#org-name', { hasText: 'default' }).waitFor(T);
    check(!page.url().includes(SK), 'the key is not in the URL');
    check((await page.evaluate(() => document.cookie)) === '', 'no cookie is set');
    check((await context.cookies()).length === 0, 'no cookie in the browser context');

    step('the agent is ready; the other org\'s agent is not listed');
    const agentRow = page.locator(`tr[data-agent="${AGENT}"]`);
    await agentRow.locator('[data-health="ready"]').waitFor(T);
    check(!(await page.content()).includes(OTHER_AGENT), 'another org\'s agent is not visible');
    await shot('02-agents.png');

    step('start a session from the sessions page; it appears in the live list without reload');
    await page.click('header nav a[data-page="sessions"]');
    await page.locator('#sessions-table').waitFor(T);
    await page.locator('body[data-live="on"]').waitFor(T);
    await page.evaluate(() => { window.__noReload = true; });
    await page.fill('#start-body', '{"hello": "dashboard"}');
    await page.click('#start-session');
    const sid = (await page.locator('#started-id').textContent(T)).trim();
    check(/^[0-9a-f-]{36}$/.test(sid), `session id ${sid}`);
    const row = page.locator(`#sessions-body tr[data-session="${sid}"]`);
    await row.waitFor(T);
    check(await page.evaluate(() => window.__noReload === true), 'the page was not reloaded');
    check((await row.getAttribute('data-status')) === 'active', 'the new row is active');
    await shot('03-sessions-live.png');

    step('open the session');
    await row.locator('a').first().click();
    await page.locator('#session-status', { hasText: 'active' }).waitFor(T);
    await page.locator('#timeline li[data-step="delivered"]').waitFor(T);
    await page.locator('#session-logs', { hasText: `bot started session=${sid}` }).waitFor(T);
    await shot('04-session-active.png');
    console.log(`SESSION ${sid}`);
    check((await nextLine()) === 'go', 'the test saw the session\'s process');

    step('stop it with the button (after the confirmation)');
    await page.click('#stop-session');
    await page.locator('#session-status', { hasText: 'terminated' }).waitFor(T);
    await page.locator('#timeline li[data-step="ended"]').waitFor(T);
    console.log(`STOPPED ${sid}`);
    check((await nextLine()) === 'go', 'the test saw the process gone');
    await page.locator('#session-logs', { hasText: '"hello":"dashboard"' }).waitFor(T);
    await page.locator('#session-logs .platform').first().waitFor(T);
    await shot('05-session-ended.png');

    step('the list shows it terminated');
    await page.click('header nav a[data-page="sessions"]');
    await page.locator(`#sessions-body tr[data-session="${sid}"][data-status="terminated"]`).waitFor(T);
    await page.selectOption('#f-reason', 'completed');
    await page.locator('#sessions-total').waitFor(T);
    await page.waitForFunction((id) => location.hash.includes('endReason=completed') && !document.querySelector(`tr[data-session="${id}"]`) && /sessions/.test(document.querySelector('#sessions-total').textContent), sid, T);
    await page.selectOption('#f-reason', 'stopped');
    await page.locator(`#sessions-body tr[data-session="${sid}"]`).waitFor(T);

    step('the logs page tails the agent\'s logs');
    await page.evaluate((a) => { location.hash = `#/logs?agent=${encodeURIComponent(a)}`; }, AGENT);
    await page.locator('#logs-tail', { hasText: `bot started session=${sid}` }).waitFor(T);
    await shot('06-logs.png');

    step('a deleted agent\'s sessions: the selector names it, marked deleted; no start offered');
    await page.evaluate((a) => { location.hash = `#/sessions?agent=${encodeURIComponent(a)}`; }, DELETED_AGENT);
    await page.locator(`#sessions-body tr[data-session="${DELETED_SESSION}"]`).waitFor(T);
    check((await page.locator('#f-agent').inputValue()) === DELETED_AGENT, 'the selector shows the deleted agent');
    const picked = (await page.locator('#f-agent option:checked').textContent()).trim();
    check(picked === `${DELETED_AGENT} (deleted)`, `the selected option reads ${picked}`);
    await page.locator('#agent-deleted').waitFor(T);
    check((await page.locator('#start-session').count()) === 0, 'no start is offered for a deleted agent');
    check(!(await page.content()).includes('Start a test session on ' + DELETED_AGENT), 'no start text for it');
    await page.evaluate((a) => { location.hash = `#/logs?agent=${encodeURIComponent(a)}`; }, DELETED_AGENT);
    await page.locator('#l-agent option[data-deleted]').waitFor({ state: 'attached', ...T });
    check((await page.locator('#l-agent').inputValue()) === DELETED_AGENT, 'the logs selector shows the deleted agent');
    await page.waitForFunction(() => document.querySelector('#logs-tail').textContent.includes('[cattery] session'), null, T);

    step('keys: create one (shown once), then revoke it');
    await page.click('header nav a[data-page="keys"]');
    await page.fill('#key-name-input', 'e2e-dashboard');
    await page.click('#create-key');
    await page.locator('#new-key code').waitFor(T);
    const keyRow = page.locator('#keys-body tr', { hasText: 'e2e-dashboard' });
    await keyRow.locator('button', { hasText: 'Revoke' }).click();
    await keyRow.locator('td', { hasText: 'revoked' }).waitFor(T);
    await shot('07-keys.png');

    step('nodes: the default org\'s private key sees this node, alive, and the one that left');
    await page.locator('#nav-nodes').waitFor({ state: 'visible', ...T });
    await page.click('#nav-nodes');
    const self = page.locator('#nodes-body tr', { hasText: 'this node' });
    await self.locator('[data-state="alive"]').waitFor(T);
    check((await self.locator('button').count()) === 0, 'a live node cannot be forgotten');
    await self.locator(`[data-commit="${COMMIT}"]`, { hasText: COMMIT || 'unknown' }).waitFor(T);
    await page.waitForFunction(() => /s ago/.test(document.querySelector('#nodes-body').textContent), null, T);
    const left = page.locator(`#nodes-body tr[data-node="${LEFT_NODE}"]`);
    await left.locator('[data-state="left"]').waitFor(T);
    check((await page.locator('#nodes-body tr').count()) === 2, 'two nodes listed');
    await shot('07b-nodes.png');
    step('forget the node that left');
    await left.locator('button', { hasText: 'Forget' }).click();
    await left.waitFor({ state: 'detached', ...T });
    await page.locator('#flash', { hasText: 'forgotten' }).waitFor(T);
    check((await page.locator('#nodes-body tr').count()) === 1, 'one node left listed');

    step('sign out forgets the key');
    await page.click('#signout');
    await page.locator('#signin').waitFor({ state: 'visible', ...T });
    check((await page.evaluate(() => sessionStorage.length)) === 0, 'session storage is empty');
    await page.reload();
    await page.locator('#signin').waitFor({ state: 'visible', ...T });

    step('the other org sees its own agent only');
    await page.fill('#signin-key', OTHER_SK);
    await page.click('#signin-button');
    await page.locator('#org-name', { hasText: 'other' }).waitFor(T);
    await page.locator(`tr[data-agent="${OTHER_AGENT}"]`).waitFor(T);
    check(await page.locator('#nav-nodes').isHidden(), 'another org is not offered the nodes page');
    await page.evaluate(() => { location.hash = '#/nodes'; });
    await page.locator('#main .error').waitFor(T);
    check((await page.locator('#nodes-body tr').count()) === 0, 'another org sees no node');
    await page.evaluate(() => { location.hash = '#/agents'; });
    check((await page.locator(`tr[data-agent="${AGENT}"]`).count()) === 0, 'the first org\'s agent is not visible');
    await page.evaluate((a) => { location.hash = `#/sessions?agent=${encodeURIComponent(a)}`; }, AGENT);
    await page.locator('#main', { hasText: 'not found' }).waitFor(T);
    await shot('08-other-org.png');

    check(problems.length === 0, `no script errors: ${problems.join('; ')}`);
    step('all checks passed');
  } catch (e) {
    await shot('failure.png').catch(() => {});
    throw e;
  } finally {
    lines.close();
    await browser.close();
  }
}

main().then(() => process.exit(0), (e) => { console.error(e && e.stack ? e.stack : e); process.exit(1); });
