// The dashboard keeps up with the user, in a real browser (Debian's chromium through
// playwright-core). Run by the e2e test `dashboard::dashboard_keeps_up_with_the_user`
// (dashboard.rs), which starts the server and deploys CATTERY_AGENT (ready, one warm instance).
//   - keyboard: the focus stays on a row's button while the page refreshes the rows, and on
//     a filter that the keyboard changed (the page renders again);
//   - the agents page lists an agent deployed after it opened and drops a deleted one;
//   - a wrong filter on the logs page is told next to the filters, which stay;
//   - a session link cannot make the page call another API path than the session's;
//   - a phone-sized window: no page wider than the screen;
//   - a cold start's timeline puts "delivered" after the instance's "ready";
//   - no request of the page fails (a missing icon neither), no script error;
//   - the keys page marks the key signed in with and warns before revoking it; a key revoked
//     elsewhere signs the page out, even one that only listens to the live stream.
// Environment: CATTERY_URL, CATTERY_SK, CATTERY_AGENT, CATTERY_TEST_AGENT (a command to
// deploy), CATTERY_SCREENSHOTS, NODE_PATH; CATTERY_CHROMIUM (default /usr/bin/chromium).
'use strict';

const { env, launch } = require('./browser.cjs');
const path = require('path');

const BASE = env('CATTERY_URL');
const SK = env('CATTERY_SK');
const AGENT = env('CATTERY_AGENT');
const TEST_AGENT = env('CATTERY_TEST_AGENT');
const SHOTS = env('CATTERY_SCREENSHOTS');
function step(msg) { console.error(`[dashboard ux e2e] ${msg}`); }
function check(cond, msg) { if (!cond) throw new Error(`check failed: ${msg}`); }
async function api(method, p, body) {
  const r = await fetch(BASE + p, {
    method,
    headers: { Authorization: 'Bearer ' + SK, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  check(r.ok, `${method} ${p}: ${r.status} ${text}`);
  return JSON.parse(text);
}

async function main() {
  const browser = await launch();
  const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
  const page = await context.newPage();
  const problems = [];
  const failed = [];
  const requests = [];
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`); });
  page.on('request', (r) => requests.push(new URL(r.url()).pathname));
  page.on('response', (r) => { if (r.status() >= 400) failed.push(`${r.status()} ${r.request().method()} ${new URL(r.url()).pathname}`); });
  const dialogs = [];
  let dismiss = false;
  page.on('dialog', (d) => { dialogs.push(d.message()); if (dismiss) d.dismiss(); else d.accept(); });
  const shot = (name) => page.screenshot({ path: path.join(SHOTS, name), fullPage: true });
  const T = { timeout: 30000 };

  try {
    step('sign in with the keyboard only');
    await page.goto(BASE + '/dashboard');
    await page.locator('#signin').waitFor({ state: 'visible', ...T });
    await page.keyboard.press('Tab');
    check(await page.evaluate(() => document.activeElement.id === 'signin-key'), 'the first Tab reaches the key field');
    await page.keyboard.type(SK);
    await page.keyboard.press('Enter');
    const agentRow = page.locator(`tr[data-agent="${AGENT}"]`);
    await agentRow.locator('[data-health="ready"]').waitFor(T);

    step('the focus stays on a row\'s button across the page\'s refreshes');
    await agentRow.locator('button', { hasText: 'Details' }).focus();
    const refreshed = () => page.evaluate(() => { window.__rowsBefore = document.querySelector('#agents-table tbody tr'); });
    await refreshed();
    await page.waitForFunction(() => document.querySelector('#agents-table tbody tr') !== window.__rowsBefore, null, T);
    const focused = await page.evaluate(() => [document.activeElement.textContent, document.activeElement.closest('tr') && document.activeElement.closest('tr').dataset.agent]);
    check(focused[0] === 'Details' && focused[1] === AGENT, `the focus stays on Details of ${AGENT}, is on ${JSON.stringify(focused)}`);
    await page.keyboard.press('Enter');
    await page.locator('#agent-detail h2', { hasText: AGENT }).waitFor(T);

    step('an agent deployed while the page is open appears; deleted, it goes');
    await api('POST', '/v1/agents', { serviceName: 'late-comer', command: [TEST_AGENT] });
    await page.locator('tr[data-agent="late-comer"]').waitFor(T);
    await api('DELETE', '/v1/agents/late-comer');
    await page.locator('#agents-table tbody tr', { hasText: 'late-comer' }).waitFor({ state: 'detached', ...T });
    check((await page.locator('#agents-table .error').count()) === 0, 'no error row for the deleted agent');

    step('a wrong session id on the logs page: told next to the filters, which stay');
    const before = failed.length;
    await page.evaluate((a) => { location.hash = `#/logs?agent=${encodeURIComponent(a)}&sessionId=not-a-session`; }, AGENT);
    await page.locator('#logs-error', { hasText: 'UUID' }).waitFor(T);
    check((await page.locator('#l-session').inputValue()) === 'not-a-session', 'the session filter stays, with what was typed');
    await shot('09-logs-bad-filter.png');
    await page.fill('#l-session', '');
    await page.locator('#l-session').dispatchEvent('change');
    await page.locator('#logs-tail div').first().waitFor(T);
    check((await page.locator('#logs-error').textContent()) === '', 'the error goes once the filter is right');
    check(failed.length === before + 1 && /^400 GET .*\/logs$/.test(failed[before]), `one 400 from the logs API: ${failed.slice(before)}`);
    failed.length = before;

    step('a filter changed with the keyboard keeps the focus: arrow keys walk a select');
    await page.evaluate((a) => { location.hash = `#/sessions?agent=${encodeURIComponent(a)}`; }, AGENT);
    await page.locator('#sessions-total', { hasText: 'sessions' }).waitFor(T);
    await page.focus('#f-reason');
    await page.keyboard.press('ArrowDown');
    await page.waitForFunction(() => location.hash.includes('endReason=completed') && /sessions/.test((document.querySelector('#sessions-total') || {}).textContent || ''), null, T);
    const onReason = await page.evaluate(() => document.activeElement.id);
    check(onReason === 'f-reason', `the focus stays on the end reason filter, is on ${onReason || 'the page'}`);
    await page.keyboard.press('ArrowDown');
    await page.waitForFunction(() => location.hash.includes('endReason=error') && /sessions/.test((document.querySelector('#sessions-total') || {}).textContent || ''), null, T);

    step('a crafted session link calls no other API path than the session\'s');
    requests.length = 0;
    await page.evaluate((a) => { location.hash = `#/session/${encodeURIComponent(a)}/..%2F..%2F${encodeURIComponent(a)}`; }, AGENT);
    await page.locator('#main .error').waitFor(T);
    // The sessions page just left may still finish a refresh of its list (begun before the
    // link was followed): that path is not one a crafted id could reach (`..` would lead to
    // `/v1/agents/<agent>` or above), so it is not counted.
    const strays = requests.filter((p) => p.startsWith('/v1/') && !p.startsWith(`/v1/agents/${AGENT}/sessions/`) && p !== `/v1/agents/${AGENT}/sessions` && p !== `/v1/agents/${AGENT}/logs` && p !== '/v1/sessions/events');
    check(strays.length === 0, `no other API path: ${strays}`);
    failed.length = before;

    step('a cold start\'s timeline: delivered after the instance is ready');
    await api('POST', '/v1/agents', { serviceName: 'cold-one', command: [TEST_AGENT] });
    await page.evaluate(() => { location.hash = '#/sessions?agent=cold-one'; });
    await page.click('#start-session', T);
    const sid = (await page.locator('#started-id').textContent(T)).trim();
    await page.evaluate((id) => { location.hash = `#/session/cold-one/${id}`; }, sid);
    await page.locator('#timeline li[data-step="delivered"]').waitFor(T);
    await page.locator('#timeline li[data-step="instance"]', { hasText: ' ready' }).waitFor(T);
    const steps = await page.$$eval('#timeline li', (l) => l.map((x) => x.dataset.step + (/ ready/.test(x.textContent) ? ':ready' : '')));
    check(steps.indexOf('instance:ready') < steps.indexOf('delivered'), `ready before delivered: ${steps}`);
    await page.click('#stop-session');
    await page.locator('#session-status', { hasText: 'terminated' }).waitFor(T);

    step('the private key is shown by its prefix once');
    await page.evaluate(() => { location.hash = '#/keys'; });
    await page.locator('#keys-body tr').first().waitFor(T);
    const keys = await page.locator('#keys-body').textContent();
    check(!/\.\.\.…|……/.test(keys), `no doubled ellipsis in ${keys}`);

    step('a phone-sized window: no page is wider than the screen');
    await page.setViewportSize({ width: 375, height: 740 });
    for (const p of ['agents', `sessions?agent=${AGENT}`, `logs?agent=${AGENT}`, 'keys', 'nodes']) {
      await page.evaluate((h) => { location.hash = '#/' + h; }, p);
      await page.locator('#main table, #main pre').first().waitFor(T);
      const [sw, cw] = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
      check(sw <= cw, `#/${p} is ${sw} px wide in a ${cw} px window`);
    }
    await page.evaluate(() => { location.hash = '#/agents'; });
    await agentRow.locator('button', { hasText: 'Details' }).click(T);
    await page.locator('#agent-detail h2', { hasText: AGENT }).waitFor(T);
    await shot('10-agents-narrow.png');

    check(failed.length === 0, `no request failed: ${failed.join('; ')}`);

    step('the keys page marks the key signed in with, and says before revoking it that it signs out');
    await page.setViewportSize({ width: 1360, height: 900 });
    const me = (await api('GET', '/v1/users')).user.userId;
    await page.evaluate(() => { location.hash = '#/keys'; });
    const own = page.locator(`#keys-body tr[data-key="${me}"][data-signed-in]`);
    await own.waitFor(T);
    check((await page.locator('#keys-body tr[data-signed-in]').count()) === 1, 'one key is marked');
    dismiss = true;
    await own.locator('button', { hasText: 'Revoke' }).click();
    check(/signed out/.test(dialogs[dialogs.length - 1]), `the confirmation warns: ${dialogs[dialogs.length - 1]}`);
    dismiss = false;

    step('the key revoked elsewhere: the sessions page, which only listens, signs out');
    await page.evaluate(() => { location.hash = '#/sessions?agent=cold-one'; });
    await page.locator('#sessions-total', { hasText: 'sessions' }).waitFor(T);
    await page.locator('body[data-live="on"]').waitFor(T);
    await api('DELETE', `/v1/organizations/default/apiKeys/${me}`);
    await page.locator('#signin-error', { hasText: 'revoked' }).waitFor(T);
    check(await page.locator('#app').isHidden(), 'signed out');
    check(problems.length === 0, `no script errors: ${problems.join('; ')}`);
    step('all checks passed');
  } catch (e) {
    await shot('ux-failure.png').catch(() => {});
    throw e;
  } finally {
    await browser.close();
  }
}

main().then(() => process.exit(0), (e) => { console.error(e && e.stack ? e.stack : e); process.exit(1); });
