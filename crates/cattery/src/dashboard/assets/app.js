// Cattery dashboard: plain JavaScript over the Cattery API, no framework, no build step.
// The signed-in key lives in sessionStorage (this tab only) and goes out as
// `Authorization: Bearer`; nothing else keeps it. Every text from the server is put into the
// page with textContent (never parsed as HTML).
'use strict';

const KEY = 'cattery.key';
const PAGE_SIZE = 50;
const $ = (id) => document.getElementById(id);

// ---- DOM helper ----------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
// Replaces `el`'s children (or `el` itself, for a row) with fresh ones, keeping the keyboard
// focus: a focused element that has a `data-focus` key gets it back in the new content, so a
// page that refreshes its rows does not throw a keyboard user back to the top.
function keepFocus(el, replace) {
  const a = document.activeElement;
  const key = a && a !== document.body && el.contains(a) ? a.dataset.focus : null;
  const where = replace() || el;
  if (!key) return;
  const again = where.querySelector(`[data-focus="${CSS.escape(key)}"]`);
  if (again) again.focus();
}
const replaceKids = (el, kids) => keepFocus(el, () => { el.replaceChildren(...kids); });
const replaceRow = (old, row) => keepFocus(old, () => { old.replaceWith(row); return row; });
const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : '');
const fmtBytes = (b) => (b >= 1048576 ? (b / 1048576).toFixed(1) + ' MiB' : (b / 1024).toFixed(0) + ' KiB');
const enc = encodeURIComponent;

function flash(msg, isError) {
  const f = $('flash');
  f.textContent = msg || '';
  f.className = isError ? 'error' : '';
}

// ---- API -----------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || 'HTTP ' + status);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body, key) {
  const k = key || sessionStorage.getItem(KEY);
  const headers = { Authorization: 'Bearer ' + k };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'omit',
    cache: 'no-store',
  });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401 && !key) {
    signOut('Your key was refused: ' + ((data && data.error) || 'unauthorized'));
    throw new ApiError(401, data);
  }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

// ---- sign in / out -------------------------------------------------------------------
const me = { org: null, name: null, id: null };

async function signIn(key) {
  const u = await api('GET', '/v1/users', undefined, key);
  sessionStorage.setItem(KEY, key);
  me.org = u.user.organization;
  me.name = u.user.name;
  me.id = u.user.userId; // the id of the key signed in with
  $('org-name').textContent = me.org;
  $('key-name').textContent = u.user.name + ' (' + u.user.keyType + ')';
  $('signin').hidden = true;
  $('app').hidden = false;
  // The cluster's nodes are the operator's (a private key of the default org): offer the page
  // only to a key that may read them.
  $('nav-nodes').hidden = true;
  api('GET', '/v1/cluster/nodes').then(() => { $('nav-nodes').hidden = false; }, () => {});
  events.start();
  route();
}

function signOut(msg) {
  sessionStorage.removeItem(KEY);
  events.stop();
  stopTimers();
  me.org = null;
  me.id = null;
  $('app').hidden = true;
  $('main').replaceChildren();
  $('signin').hidden = false;
  $('signin-key').value = '';
  $('signin-error').textContent = msg || '';
  if (location.hash) history.replaceState(null, '', '/dashboard');
}

$('signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const key = $('signin-key').value.trim();
  $('signin-error').textContent = '';
  try {
    await signIn(key);
  } catch (err) {
    $('signin-error').textContent = err.status === 401
      ? 'This key was refused (' + err.message + ').'
      : 'Could not sign in: ' + err.message;
  }
});
$('signout').addEventListener('click', () => signOut(''));

// ---- live session events (server-sent events over fetch, so the key stays in a header) --
const events = {
  ctl: null,
  listeners: new Set(),
  start() {
    this.stop();
    const ctl = new AbortController();
    this.ctl = ctl;
    this.run(ctl).catch(() => {});
  },
  stop() {
    if (this.ctl) this.ctl.abort();
    this.ctl = null;
    $('live-state').textContent = '○';
  },
  async run(ctl) {
    while (!ctl.signal.aborted) {
      try {
        const r = await fetch('/v1/sessions/events', {
          headers: { Authorization: 'Bearer ' + sessionStorage.getItem(KEY), Accept: 'text/event-stream' },
          signal: ctl.signal,
          cache: 'no-store',
        });
        if (r.status === 401) {
          // The key was revoked (from the CLI, another tab): a page that only listens to
          // the stream would otherwise go stale without a word.
          let data = null;
          try { data = await r.json(); } catch (_) { data = null; }
          signOut('Your key was refused: ' + ((data && data.error) || 'unauthorized'));
          return;
        }
        if (!r.ok) throw new Error('HTTP ' + r.status);
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            this.dispatch(buf.slice(0, i));
            buf = buf.slice(i + 2);
          }
        }
      } catch (_) { /* reconnect below */ }
      $('live-state').textContent = '○';
      if (ctl.signal.aborted) return;
      await new Promise((res) => setTimeout(res, 1000));
    }
  },
  dispatch(block) {
    let ev = 'message';
    let data = '';
    for (const line of block.split('\n')) {
      if (line.startsWith('event:')) ev = line.slice(6).trim();
      else if (line.startsWith('data:')) data += line.slice(5).trim();
    }
    // `resync`: changes made through other nodes may have been missed; read again as after `ready`.
    if (ev === 'ready' || ev === 'resync') {
      $('live-state').textContent = '●';
      document.body.dataset.live = 'on';
      for (const l of this.listeners) l({ type: 'ready' });
    } else if (ev === 'session') {
      const s = JSON.parse(data);
      for (const l of this.listeners) l({ type: 'session', session: s });
    }
  },
};

// ---- pages ---------------------------------------------------------------------------
let timers = [];
function every(ms, f) { timers.push(setInterval(f, ms)); }
let leaving = [];
function stopTimers() {
  timers.forEach(clearInterval);
  timers = [];
  leaving.forEach((f) => f());
  leaving = [];
  events.listeners.clear();
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query] = raw.split('?');
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), q: new URLSearchParams(query || '') };
}
function go(path, q) {
  const qs = q ? new URLSearchParams(Object.entries(q).filter(([, v]) => v !== '' && v != null)).toString() : '';
  location.hash = '#/' + path + (qs ? '?' + qs : '');
}

async function route() {
  if (!me.org) return;
  stopTimers();
  flash('');
  const { parts, q } = parseHash();
  const page = parts[0] || 'agents';
  document.querySelectorAll('header nav a').forEach((a) => a.classList.toggle('active', a.dataset.page === page || (page === 'session' && a.dataset.page === 'sessions')));
  const main = $('main');
  // A filter changed with the keyboard (an arrow key on a select, Tab out of a field) renders
  // the page again: the focus goes back to the same field of the new page, not to the top.
  const focused = main.contains(document.activeElement) ? document.activeElement.id : '';
  main.replaceChildren(h('p', { class: 'hint' }, 'Loading…'));
  try {
    if (page === 'agents') await agentsPage(main);
    else if (page === 'sessions') await sessionsPage(main, q);
    else if (page === 'session') await sessionPage(main, parts[1], parts[2]);
    else if (page === 'logs') await logsPage(main, q);
    else if (page === 'keys') await keysPage(main);
    else if (page === 'talk') await talkPage(main, parts[1]);
    else if (page === 'nodes') await nodesPage(main);
    else main.replaceChildren(h('p', {}, 'No such page.'));
    const again = focused && $(focused);
    if (again && main.contains(again)) again.focus();
  } catch (err) {
    if (err.status !== 401) main.replaceChildren(h('p', { class: 'error' }, 'Error: ' + err.message));
  }
}
window.addEventListener('hashchange', route);

async function agentNames() {
  const l = await api('GET', '/v1/agents');
  return l.services.map((s) => s.name).sort();
}

// A public key of the org, to start test sessions the way a client does (created once).
async function publicKey() {
  const keys = await api('GET', '/v1/organizations/' + enc(me.org) + '/apiKeys');
  const k = (keys.public || []).find((k) => !k.revoked);
  if (k) return k.key;
  const made = await api('POST', '/v1/organizations/' + enc(me.org) + '/apiKeys', { name: 'dashboard', type: 'public' });
  return made.key;
}

async function startTestSession(agent, bodyText) {
  let body;
  try {
    body = bodyText.trim() ? JSON.parse(bodyText) : {};
  } catch (e) {
    throw new Error('the body is not valid JSON: ' + e.message);
  }
  const pk = await publicKey();
  return api('POST', '/v1/public/' + enc(agent) + '/start', { body }, pk);
}

// -- agents --
async function agentsPage(main) {
  const tbody = h('tbody', {});
  const table = h('table', { id: 'agents-table' },
    h('thead', {}, h('tr', {}, ['Agent', 'Health', 'Warm pool (idle / starting / busy)', 'Min / max', 'Sessions', 'Runs', 'Deployment', ''].map((t) => h('th', {}, t)))),
    tbody);
  const none = h('p', { id: 'no-agents' }, 'No agents in this org yet (deploy one with the CLI or the API).');
  const detail = h('div', { id: 'agent-detail' });
  main.replaceChildren(h('h1', {}, 'Agents'), table, none, detail);

  // The list is read again on every refresh: an agent deployed or deleted meanwhile (by the
  // CLI, another tab) shows or goes without a reload.
  async function refresh() {
    const names = await agentNames();
    const rows = await Promise.all(names.map(async (n) => {
      try { return await api('GET', '/v1/agents/' + enc(n)); } catch (e) {
        return e.status === 404 ? null : { name: n, error: e.message }; // deleted since the list
      }
    }));
    const shown = rows.filter(Boolean);
    table.hidden = !shown.length;
    none.hidden = !!shown.length;
    replaceKids(tbody, shown.map(agentRow));
  }
  function agentRow(a) {
    if (a.error) return h('tr', {}, h('td', {}, a.name), h('td', { colspan: 7, class: 'error' }, a.error));
    const w = a.warmInstances;
    const health = h('td', {}, h('span', { class: 'state-' + a.healthState, 'data-health': a.healthState }, a.healthState.replace(/_/g, ' ')),
      a.errors.map((e) => h('div', { class: 'error' }, e.code + ': ' + e.message)),
      a.currentRevision.health.lastExitCode != null ? h('div', { class: 'hint' }, 'last exit code ' + a.currentRevision.health.lastExitCode) : null,
      a.currentRevision.health.message && a.healthState === 'crash_loop' ? h('pre', { class: 'logs' }, a.currentRevision.health.message) : null,
      a.forkServer ? h('div', { class: a.forkServer.state === 'fallback' ? 'hint error' : 'hint', 'data-fork-server': a.forkServer.state },
        'fork server: ' + a.forkServer.state + (a.forkServer.reason ? ' (' + a.forkServer.reason + ')' : '')) : null);
    return h('tr', { 'data-agent': a.name },
      h('td', {}, h('b', {}, a.name)),
      health,
      h('td', { class: 'pool' }, `${w.idle} / ${w.starting} / ${w.busy}`),
      h('td', {}, `${a.autoScaling.minReplicas} / ${a.autoScaling.maxReplicas}`),
      h('td', {}, String(a.activeSessionCount)),
      h('td', { class: 'mono' }, a.image ? a.image : (a.command || []).join(' ')),
      h('td', { class: 'mono' }, a.activeDeploymentId.slice(0, 8) + ' · ' + fmtTime(a.deployment.createdAt)),
      h('td', {},
        h('button', { type: 'button', 'data-focus': 'details:' + a.name, onclick: () => showAgent(a.name) }, 'Details'), ' ',
        h('a', { href: '#/sessions?agent=' + enc(a.name), 'data-focus': 'sessions:' + a.name }, 'Sessions'), ' ',
        h('a', { href: '#/logs?agent=' + enc(a.name), 'data-focus': 'logs:' + a.name }, 'Logs'),
        a.image ? [' ', h('a', { href: '#/talk/' + enc(a.name), class: 'talk', 'data-focus': 'talk:' + a.name, title: 'a call from this browser (SmallWebRTC)' }, 'Talk')] : null));
  }
  async function showAgent(name) {
    let deps;
    try {
      deps = await api('GET', '/v1/agents/' + enc(name) + '/deployments');
    } catch (e) {
      flash('Could not read the deployments of ' + name + ': ' + e.message, true);
      return;
    }
    const body = h('textarea', { id: 'agent-start-body', spellcheck: 'false' }, '{}');
    const out = h('p', {});
    detail.replaceChildren(h('div', { class: 'card' },
      h('h2', {}, 'Agent ' + name),
      h('h3', {}, 'Deployments (newest first)'),
      h('table', {}, h('thead', {}, h('tr', {}, ['Deployment', 'Created', 'Runs', 'Current'].map((t) => h('th', {}, t)))),
        h('tbody', {}, deps.deployments.map((d) => h('tr', {},
          h('td', { class: 'mono' }, d.id),
          h('td', {}, fmtTime(d.createdAt)),
          h('td', { class: 'mono' }, d.manifest && d.manifest.spec ? (d.manifest.spec.image || JSON.stringify(d.manifest.spec.command || '')) : ''),
          h('td', {}, d.active ? 'current' : 'previous'))))),
      h('h3', {}, 'Start a test session'), body,
      h('button', { type: 'button', class: 'primary', onclick: async () => {
        try {
          const r = await startTestSession(name, body.value);
          out.replaceChildren('Started ', h('a', { href: sessionHref(name, r.sessionId) }, r.sessionId));
        } catch (e) { out.replaceChildren(h('span', { class: 'error' }, 'Start refused: ' + e.message)); }
      } }, 'Start'), out,
      h('h3', {}, 'Delete'),
      h('button', { type: 'button', class: 'danger', onclick: async () => {
        if (!confirm('Delete agent ' + name + '? Running sessions go on; no new session can start.')) return;
        try { await api('DELETE', '/v1/agents/' + enc(name)); flash('Agent ' + name + ' deleted.'); route(); } catch (e) { flash('Delete failed: ' + e.message, true); }
      } }, 'Delete agent')));
  }
  await refresh();
  every(2000, () => refresh().catch(() => {}));
}

// -- sessions --
const sessionHref = (agent, id) => '#/session/' + enc(agent) + '/' + enc(id);
// A session's API path. The id is encoded like the name: from a crafted link, `../..` must
// stay inside the session's own path, not reach the agent's (where Stop would be a DELETE).
const sessionPath = (agent, id) => '/v1/agents/' + enc(agent) + '/sessions/' + enc(id);

function sessionRow(s, agent) {
  const active = s.status === 'active';
  const stop = h('button', { type: 'button', class: 'danger stop', 'data-focus': 'stop:' + s.sessionId, disabled: !active, onclick: () => stopSession(agent, s.sessionId) }, 'Stop');
  return h('tr', { 'data-session': s.sessionId, 'data-status': active ? 'active' : 'terminated' },
    h('td', { class: 'mono' }, h('a', { href: sessionHref(agent, s.sessionId), 'data-focus': 'open:' + s.sessionId }, s.sessionId)),
    h('td', {}, h('span', { class: 'status state-' + (active ? 'active' : 'terminated') }, active ? 'active' : 'terminated'),
      s.waitingForClient ? h('div', { class: 'hint waiting' }, 'waiting for its client') : null),
    h('td', {}, fmtTime(s.createdAt)),
    h('td', {}, s.coldStart == null ? '' : s.coldStart ? 'cold' : 'warm'),
    h('td', {}, s.botStartSeconds == null ? '' : s.botStartSeconds.toFixed(3) + ' s'),
    h('td', {}, fmtTime(s.endedAt)),
    h('td', {}, s.endReason || ''),
    h('td', {}, s.exitCode != null ? 'exit ' + s.exitCode : s.exitSignal != null ? 'signal ' + s.exitSignal : ''),
    h('td', {}, stop));
}

async function stopSession(agent, id) {
  if (!confirm('Stop session ' + id + '? Its instance is terminated.')) return null;
  try {
    await api('DELETE', sessionPath(agent, id));
    const s = await api('GET', sessionPath(agent, id));
    flash('Session ' + id + ' stopped.');
    updateSessionRow(s);
    return s;
  } catch (e) {
    flash('Stop failed: ' + e.message, true);
    return null;
  }
}

function updateSessionRow(s) {
  const old = document.querySelector(`tr[data-session="${CSS.escape(s.sessionId)}"]`);
  if (old) replaceRow(old, sessionRow(s, s.serviceName));
}

function toUnix(v) { return v ? String(Math.floor(new Date(v).getTime() / 1000)) : ''; }

async function sessionsPage(main, q) {
  const names = await agentNames();
  const agent = q.get('agent') || names[0] || '';
  const page = Math.max(0, parseInt(q.get('page') || '0', 10) || 0);
  const f = { agent, status: q.get('status') || 'all', startType: q.get('startType') || 'all', endReason: q.get('endReason') || 'any', from: q.get('from') || '', to: q.get('to') || '' };
  const sel = (id, opts, val) => h('select', { id }, opts.map((o) => h('option', { value: o, selected: o === val }, o)));
  // A deleted agent's sessions stay listable by its name: the selector shows it, marked.
  const deleted = !!agent && !names.includes(agent);
  const agentSel = sel('f-agent', names, agent);
  if (deleted) agentSel.prepend(h('option', { value: agent, selected: true, 'data-deleted': '' }, agent + ' (deleted)'));
  const statusSel = sel('f-status', ['all', 'active', 'ended'], f.status);
  const typeSel = sel('f-start', ['all', 'cold', 'warm'], f.startType);
  const reasonSel = sel('f-reason', ['any', 'completed', 'error', 'stopped', 'stopped_during_start', 'max_duration', 'start_failed', 'client_disconnected', 'drained', 'lost', 'out_of_memory', 'client_never_connected'], f.endReason);
  const from = h('input', { id: 'f-from', type: 'datetime-local', value: f.from });
  const to = h('input', { id: 'f-to', type: 'datetime-local', value: f.to });
  const apply = () => go('sessions', { agent: agentSel.value, status: statusSel.value, startType: typeSel.value, endReason: reasonSel.value === 'any' ? '' : reasonSel.value, from: from.value, to: to.value });
  [agentSel, statusSel, typeSel, reasonSel, from, to].forEach((el) => el.addEventListener('change', apply));

  const tbody = h('tbody', { id: 'sessions-body' });
  const total = h('span', { id: 'sessions-total' });
  const body = h('textarea', { id: 'start-body', spellcheck: 'false' }, '{}');
  const startOut = h('span', { id: 'start-result' });
  main.replaceChildren(
    h('h1', {}, 'Sessions'),
    h('div', { class: 'filters' },
      h('label', {}, 'Agent', agentSel), h('label', {}, 'Status', statusSel), h('label', {}, 'Start', typeSel), h('label', {}, 'End reason', reasonSel),
      h('label', {}, 'Created from', from), h('label', {}, 'Created to', to)),
    deleted ? h('p', { class: 'hint', id: 'agent-deleted' }, 'Agent ' + agent + ' is deleted: its sessions are listed here; no new session can start.')
    : agent ? h('div', { class: 'card' },
      h('b', {}, 'Start a test session on ' + agent), ' (JSON body, passed to the bot as ', h('code', {}, 'args.body'), ')', body,
      h('button', { id: 'start-session', type: 'button', class: 'primary', onclick: async () => {
        startOut.textContent = 'starting…';
        try {
          const r = await startTestSession(agent, body.value);
          startOut.replaceChildren('started ', h('span', { class: 'mono', id: 'started-id' }, r.sessionId));
        } catch (e) { startOut.replaceChildren(h('span', { class: 'error' }, 'start refused: ' + e.message)); }
      } }, 'Start session'), ' ', startOut) : null,
    h('table', { id: 'sessions-table' },
      h('thead', {}, h('tr', {}, ['Session', 'Status', 'Created', 'Start', 'Bot start', 'Ended', 'End reason', 'Exit', ''].map((t) => h('th', {}, t)))),
      tbody),
    h('div', { class: 'pager' },
      h('button', { type: 'button', disabled: page === 0, onclick: () => go('sessions', { ...f, endReason: f.endReason === 'any' ? '' : f.endReason, agent, page: page - 1 }) }, '← Newer'),
      h('span', {}, 'page ' + (page + 1) + ' · '), total,
      h('button', { type: 'button', id: 'older', onclick: () => go('sessions', { ...f, endReason: f.endReason === 'any' ? '' : f.endReason, agent, page: page + 1 }) }, 'Older →')));
  if (!agent) { tbody.replaceChildren(h('tr', {}, h('td', { colspan: 9 }, 'No agents.'))); return; }

  const params = new URLSearchParams({ limit: PAGE_SIZE, offset: page * PAGE_SIZE });
  if (f.status !== 'all') params.set('status', f.status);
  if (f.startType !== 'all') params.set('startType', f.startType);
  if (f.endReason !== 'any') params.set('endReason', f.endReason);
  if (f.from) params.set('startTime', toUnix(f.from));
  if (f.to) params.set('endTime', toUnix(f.to));
  const matches = (s) => s.serviceName === agent
    && (f.status === 'all' || s.status === f.status)
    && (f.startType === 'all' || (s.coldStart ? 'cold' : 'warm') === f.startType)
    && (f.endReason === 'any' || s.endReason === f.endReason)
    && (!f.from || new Date(s.createdAt) >= new Date(f.from))
    && (!f.to || new Date(s.createdAt) <= new Date(f.to));
  let count = 0;
  const load = async () => {
    const l = await api('GET', '/v1/agents/' + enc(agent) + '/sessions?' + params);
    count = l.total_count;
    total.textContent = count + ' sessions';
    replaceKids(tbody, l.sessions.map((s) => sessionRow(s, agent)));
    $('older').disabled = (page + 1) * PAGE_SIZE >= count;
  };
  // Changes arrive as events; the first page also takes new sessions at its top.
  events.listeners.add((ev) => {
    if (ev.type === 'ready') { load().catch(() => {}); return; }
    const s = ev.session;
    const row = tbody.querySelector(`tr[data-session="${CSS.escape(s.sessionId)}"]`);
    if (row) {
      if (matches(s)) replaceRow(row, sessionRow(s, agent));
      else row.remove();
    } else if (page === 0 && matches(s) && s.status === 'active') {
      tbody.prepend(sessionRow(s, agent));
      count += 1;
      total.textContent = count + ' sessions';
      while (tbody.children.length > PAGE_SIZE) tbody.lastChild.remove();
    }
  });
  await load();
}

// -- one session --
function drawChart(canvas, series) {
  const ctx = canvas.getContext('2d');
  const W = canvas.width, H = canvas.height, pad = 30;
  ctx.clearRect(0, 0, W, H);
  ctx.font = '11px sans-serif';
  if (!series.length) { ctx.fillText('no samples yet', pad, H / 2); return; }
  const t0 = series[0].t, t1 = Math.max(series[series.length - 1].t, t0 + 1);
  const plot = (key, color, label, fmt) => {
    const max = Math.max(1, ...series.map((p) => p[key]));
    ctx.strokeStyle = color; ctx.beginPath();
    series.forEach((p, i) => {
      const x = pad + (W - 2 * pad) * (p.t - t0) / (t1 - t0);
      const y = H - pad - (H - 2 * pad) * p[key] / max;
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = color;
    series.forEach((p) => {
      const x = pad + (W - 2 * pad) * (p.t - t0) / (t1 - t0);
      ctx.fillRect(x - 2, H - pad - (H - 2 * pad) * p[key] / max - 2, 4, 4);
    });
    ctx.fillText(label + ' (max ' + fmt(max) + ')', key === 'c' ? pad : W / 2, 14);
  };
  plot('c', '#3b5bdb', 'CPU', (v) => v + ' m');
  plot('m', '#e67700', 'memory', fmtBytes);
}

async function sessionPage(main, agent, id) {
  const base = sessionPath(agent, id);
  const status = h('span', { id: 'session-status' });
  const timeline = h('ol', { class: 'timeline', id: 'timeline' });
  const canvas = h('canvas', { id: 'chart', width: 720, height: 180 });
  const figures = h('p', { class: 'hint' });
  const logs = h('pre', { class: 'logs', id: 'session-logs' });
  const stop = h('button', { type: 'button', class: 'danger', id: 'stop-session', onclick: async () => {
    const s = await stopSession(agent, id);
    if (s) show(s);
  } }, 'Stop session');
  main.replaceChildren(
    h('p', {}, h('a', { href: '#/sessions?agent=' + enc(agent) }, '← sessions of ' + agent)),
    h('h1', {}, 'Session ', h('span', { class: 'mono' }, id)),
    h('p', {}, 'Status: ', status, ' ', stop),
    h('div', { class: 'card' }, h('h2', {}, 'Timeline'), timeline),
    h('div', { class: 'card' }, h('h2', {}, 'CPU and memory'), canvas, figures),
    h('div', { class: 'card' }, h('h2', {}, 'Logs'), logs));

  let platform = [];
  function show(s) {
    const active = s.status === 'active';
    status.textContent = active ? (s.waitingForClient ? 'active (waiting for its websocket client)' : 'active') : 'terminated';
    status.className = 'state-' + (active ? 'active' : 'terminated');
    stop.disabled = !active;
    const created = new Date(s.createdAt).getTime();
    const items = [['requested', s.createdAt, [s.coldStart == null ? '' : 'cold start: ' + (s.coldStart ? 'yes' : 'no'), s.transport ? 'transport ' + s.transport : ''].filter(Boolean).join(', ')]];
    for (const p of platform) items.push(['instance', p.timestamp, p.log]);
    // Delivered when the platform's own line says so (created + botStartSeconds, both rounded
    // to the millisecond, can fall before the instance's "ready" line of the same instant).
    const said = platform.find((p) => / delivered after /.test(p.log));
    if (s.botStartSeconds != null) items.push(['delivered', said ? said.timestamp : new Date(created + s.botStartSeconds * 1000).toISOString(), 'after ' + s.botStartSeconds.toFixed(3) + ' s']);
    if (s.endedAt) items.push(['ended', s.endedAt, [s.endReason, s.completionStatus, s.exitCode != null ? 'exit ' + s.exitCode : '', s.exitSignal != null ? 'signal ' + s.exitSignal : '', s.endMessage || ''].filter(Boolean).join(' · ')]);
    items.sort((a, b) => new Date(a[1]) - new Date(b[1]));
    timeline.replaceChildren(...items.map(([what, at, more]) => h('li', { 'data-step': what }, h('b', {}, what), ' ', fmtTime(at), more ? ' — ' + more : '')));
    const rm = s.resourceMetrics;
    drawChart(canvas, rm ? rm.timeseries : []);
    figures.textContent = rm ? `${rm.sampleCount} samples · CPU p50 ${rm.cpuMillicoresP50} m, p95 ${rm.cpuMillicoresP95} m · memory p50 ${fmtBytes(rm.memoryBytesP50)}, p95 ${fmtBytes(rm.memoryBytesP95)}` : 'No samples (sampled every few seconds while the session runs).';
  }
  const tail = logTail(logs, agent, { sessionId: id });
  let last = null;
  const refresh = async () => {
    const s = await api('GET', base);
    const lines = await tail.poll();
    platform = lines.filter((l) => l.stream === 'platform');
    last = s;
    show(s);
  };
  events.listeners.add((ev) => { if (ev.type === 'ready' || (ev.type === 'session' && ev.session.sessionId === id)) refresh().catch(() => {}); });
  await refresh();
  every(2000, () => { if (!last || last.status === 'active' || tail.recent()) refresh().catch(() => {}); });
}

// A live tail of an agent's logs into `pre`: the newest lines first, then only lines newer
// than the last one seen (by time), with the filters of the logs API.
function logTail(pre, agent, filters) {
  const seen = new Set();
  const all = [];
  let lastNs = null;
  let lastNew = Date.now();
  const key = (l) => l.timestamp + '|' + l.instanceId + '|' + l.log;
  return {
    recent: () => Date.now() - lastNew < 10000,
    async poll() {
      const p = new URLSearchParams({ limit: 1000, order: lastNs ? 'asc' : 'desc' });
      for (const [k, v] of Object.entries(filters)) if (v) p.set(k, v);
      if (lastNs) p.set('startTime', lastNs);
      const page = await api('GET', '/v1/agents/' + enc(agent) + '/logs?' + p);
      const lines = lastNs ? page.logs : page.logs.reverse();
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      for (const l of lines) {
        const k = key(l);
        if (seen.has(k)) continue;
        seen.add(k);
        all.push(l);
        lastNew = Date.now();
        pre.append(h('div', { class: l.stream }, new Date(l.timestamp).toISOString().slice(11, 23) + ' ' + l.stream.padEnd(8) + ' ' + l.log));
      }
      if (all.length) {
        const t = all[all.length - 1].timestamp;
        // Seconds with the sub-second part of the ISO time, 2 s back: a container's lines
        // carry the engine's time and may be stored after a platform line of a later instant
        // (docs/logs.md). Lines seen already come again and are skipped by `seen`.
        const frac = (t.match(/\.(\d+)/) || ['', '0'])[1];
        lastNs = (Math.floor(new Date(t).getTime() / 1000) - 2) + '.' + frac.padEnd(9, '0').slice(0, 6);
      }
      while (pre.children.length > 5000) pre.firstChild.remove();
      if (atBottom) pre.scrollTop = pre.scrollHeight;
      return all;
    },
  };
}

// -- logs --
async function logsPage(main, q) {
  const names = await agentNames();
  const agent = q.get('agent') || names[0] || '';
  const agentSel = h('select', { id: 'l-agent' }, names.map((n) => h('option', { value: n, selected: n === agent }, n)));
  // A deleted agent's logs stay readable by its name, as its sessions do.
  if (agent && !names.includes(agent)) agentSel.prepend(h('option', { value: agent, selected: true, 'data-deleted': '' }, agent + ' (deleted)'));
  const session = h('input', { id: 'l-session', placeholder: 'session id', value: q.get('sessionId') || '', size: 38 });
  const query = h('input', { id: 'l-query', placeholder: 'contains text', value: q.get('query') || '' });
  const deployment = h('input', { id: 'l-deployment', placeholder: 'deployment id', value: q.get('deploymentId') || '', size: 38 });
  const apply = () => go('logs', { agent: agentSel.value, sessionId: session.value.trim(), query: query.value, deploymentId: deployment.value.trim() });
  [agentSel, session, query, deployment].forEach((el) => el.addEventListener('change', apply));
  const pre = h('pre', { class: 'logs', id: 'logs-tail' });
  const error = h('p', { class: 'error', id: 'logs-error', role: 'alert' });
  main.replaceChildren(h('h1', {}, 'Logs'),
    h('div', { class: 'filters' }, h('label', {}, 'Agent', agentSel), h('label', {}, 'Session', session),
      h('label', {}, 'Deployment', deployment), h('label', {}, 'Text', query)),
    error, h('p', { class: 'hint' }, 'Live: new lines appear every two seconds.'), pre);
  if (!agent) return;
  const tail = logTail(pre, agent, { sessionId: q.get('sessionId'), query: q.get('query'), deploymentId: q.get('deploymentId') });
  // A refused filter (a session id that is not one, say) is told beside the filters, which
  // stay to be corrected (a change of them reads again); other errors are retried.
  let refused = false;
  const poll = () => tail.poll().then(() => { error.textContent = ''; }, (e) => {
    if (e.status === 401) return;
    refused = e.status === 400;
    error.textContent = (refused ? 'The logs API refused these filters: ' : 'Could not read the logs: ') + e.message;
  });
  await poll();
  every(2000, () => { if (!refused) poll(); });
}

// -- keys and secrets --
async function keysPage(main) {
  const base = '/v1/organizations/' + enc(me.org) + '/apiKeys';
  const keyTable = h('tbody', { id: 'keys-body' });
  const name = h('input', { id: 'key-name-input', placeholder: 'name' });
  const type = h('select', { id: 'key-type' }, h('option', { value: 'public' }, 'public'), h('option', { value: 'private' }, 'private'));
  const made = h('div', { id: 'new-key' });
  const sets = h('tbody', { id: 'secret-sets' });
  main.replaceChildren(h('h1', {}, 'API keys'),
    h('div', { class: 'filters' }, h('label', {}, 'Name', name), h('label', {}, 'Type', type),
      h('button', { type: 'button', class: 'primary', id: 'create-key', onclick: async () => {
        try {
          const k = await api('POST', base, { name: name.value, type: type.value });
          made.replaceChildren(h('p', { class: 'newkey' }, 'New ' + k.type + ' key (shown once): ', h('code', {}, k.key)));
          name.value = '';
          await loadKeys();
        } catch (e) { made.replaceChildren(h('p', { class: 'error' }, 'Not created: ' + e.message)); }
      } }, 'Create key')),
    made,
    h('table', {}, h('thead', {}, h('tr', {}, ['Name', 'Type', 'Key', 'Created', 'State', ''].map((t) => h('th', {}, t)))), keyTable),
    h('h1', {}, 'Secret sets'),
    h('p', { class: 'hint' }, 'Names only: values are never shown. Set values with the CLI or the API.'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Set', 'Type', 'Keys'].map((t) => h('th', {}, t)))), sets));
  async function loadKeys() {
    const l = await api('GET', base);
    const rows = [...(l.private || []), ...(l.public || [])];
    replaceKids(keyTable, rows.map((k) => h('tr', { 'data-key': k.id, 'data-signed-in': k.id === me.id },
      h('td', {}, k.metadata.name, k.id === me.id ? h('span', { class: 'hint' }, ' (signed in here)') : null), h('td', {}, k.type),
      // The API lists a private key by its prefix already (`sk_1234ab...`).
      h('td', { class: 'mono' }, k.type === 'public' || k.key.endsWith('...') ? k.key : k.key.slice(0, 12) + '...'),
      h('td', {}, fmtTime(k.createdAt)),
      h('td', {}, k.revoked ? 'revoked ' + fmtTime(k.revokedAt) : 'live'),
      h('td', {}, k.revoked ? '' : h('button', { type: 'button', class: 'danger', 'data-focus': 'revoke:' + k.id, onclick: async () => {
        const own = k.id === me.id;
        if (!confirm('Revoke key ' + k.metadata.name + '? It stops working at once.' + (own ? ' It is the key this dashboard is signed in with: you will be signed out.' : ''))) return;
        try {
          await api('DELETE', base + '/' + enc(k.id));
          if (own) signOut('You revoked the key this dashboard was signed in with.');
          else await loadKeys();
        } catch (e) { flash('Revoke failed: ' + e.message, true); }
      } }, 'Revoke')))));
  }
  await loadKeys();
  const l = await api('GET', '/v1/secrets');
  const rows = await Promise.all(l.sets.map(async (s) => {
    let fields = '';
    if (s.type !== 'image-pull-secret') {
      try { fields = ((await api('GET', '/v1/secrets/' + enc(s.name))).secrets || []).map((f) => f.fieldName).join(', '); } catch (_) { fields = ''; }
    }
    return h('tr', {}, h('td', {}, s.name), h('td', {}, s.type), h('td', { class: 'mono' }, fields));
  }));
  sets.replaceChildren(...rows);
}

// -- the cluster's nodes --
// GET /v1/cluster/nodes every 2 s; a node that left or died can be forgotten (DELETE), and
// the server's refusal (a live node, a dead one still owning records) is shown as it says it.
async function nodesPage(main) {
  const tbody = h('tbody', { id: 'nodes-body' });
  main.replaceChildren(h('h1', {}, 'Nodes'),
    h('p', { class: 'hint' }, 'Every node that ever heartbeat on this store. A node is dead after the node timeout without a heartbeat; a live node then takes its sessions over or ends them lost.'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Node', 'State', 'Address', 'Version', 'Commit', 'Started', 'Last heartbeat', 'Instances (busy)', ''].map((t) => h('th', {}, t)))), tbody));
  async function refresh() {
    const l = await api('GET', '/v1/cluster/nodes');
    replaceKids(tbody, l.nodes.map((n) => h('tr', { 'data-node': n.id },
      h('td', { class: 'mono' }, n.id, n.self ? h('span', { class: 'hint' }, ' (this node)') : null),
      h('td', {}, h('span', { class: 'state-' + n.state, 'data-state': n.state }, n.state)),
      h('td', { class: 'mono' }, n.advertiseUrl || '—'),
      h('td', {}, n.version || ''),
      h('td', { class: 'mono', 'data-commit': n.commit || '' }, n.commit || 'unknown'),
      h('td', {}, fmtTime(n.startedMs)),
      h('td', {}, n.heartbeatAgeMs == null ? '—' : (n.heartbeatAgeMs / 1000).toFixed(1) + ' s ago'),
      h('td', {}, String(n.instances) + ' (' + String(n.busy) + ')'),
      h('td', {}, n.state === 'alive' ? '' : h('button', { type: 'button', class: 'danger', 'data-focus': 'forget:' + n.id, onclick: async () => {
        if (!confirm('Forget node ' + n.id + '? It is listed again if it heartbeats.')) return;
        try { await api('DELETE', '/v1/cluster/nodes/' + enc(n.id)); flash('Node ' + n.id + ' forgotten.'); await refresh(); } catch (e) { flash('Not forgotten: ' + e.message, true); }
      } }, 'Forget')))));
  }
  await refresh();
  every(2000, () => refresh().catch(() => {}));
}

// ---- start ---------------------------------------------------------------------------
(async () => {
  const k = sessionStorage.getItem(KEY);
  if (!k) { signOut(''); return; }
  try { await signIn(k); } catch (e) { signOut(e.status === 401 ? 'Your key was refused.' : ''); }
})();

// -- talk to a bot --
// A SmallWebRTC call from this browser to a new `webrtc` session of the agent, through the
// session proxy, with Pipecat's client packages (talk.js, a bundle built by
// crates/cattery/dashboard-talk/build.sh and loaded only here).
let talkLoaded = null;
function loadTalk() {
  if (!talkLoaded) {
    talkLoaded = new Promise((resolve, reject) => {
      const el = h('script', { src: '/dashboard/talk.js' });
      el.addEventListener('load', () => resolve(window.CatteryTalk));
      el.addEventListener('error', () => { talkLoaded = null; reject(new Error('could not load talk.js')); });
      document.head.append(el);
    });
  }
  return talkLoaded;
}

async function talkPage(main, agent) {
  const state = h('b', { id: 'talk-state', 'data-state': 'idle', 'data-connected': 'no' }, 'idle');
  const stats = h('span', { id: 'talk-stats', 'data-packets': '0', 'data-samples': '0', 'data-level': '0' }, 'nothing received yet');
  const session = h('span', { id: 'talk-session' });
  const audio = h('audio', { id: 'talk-audio', autoplay: true });
  const error = h('p', { id: 'talk-error', class: 'error' });
  let call = null;
  // `data-connected`: the call is up (the transport connected; a bot that speaks RTVI goes
  // on to "ready" / "bot ready").
  const setState = (t) => {
    state.textContent = t;
    state.dataset.state = t;
    if (['connected', 'ready', 'bot ready'].includes(t)) state.dataset.connected = 'yes';
    if (['disconnected', 'ended', 'error'].includes(t)) state.dataset.connected = 'no';
  };
  const hangUp = h('button', { id: 'talk-hangup', type: 'button', class: 'danger', disabled: true, onclick: async () => {
    hangUp.disabled = true;
    if (call) await call.hangUp();
    call = null;
    talk.disabled = false;
  } }, 'Hang up');
  const talk = h('button', { id: 'talk-start', type: 'button', class: 'primary', onclick: async () => {
    talk.disabled = true;
    error.textContent = '';
    try {
      const [lib, pk] = await Promise.all([loadTalk(), publicKey()]);
      call = await lib.start({
        agent,
        publicKey: pk,
        audio,
        onState: setState,
        onSession: (id) => { if (id) session.replaceChildren('session ', h('a', { href: sessionHref(agent, id), class: 'mono' }, id)); },
        onStats: (s) => {
          stats.dataset.packets = s.packets;
          stats.dataset.samples = s.samples;
          stats.dataset.level = s.maxLevel.toFixed(4);
          stats.textContent = `${s.packets} audio packets (${s.samples} samples) received from the bot, peak level ${s.maxLevel.toFixed(3)}`;
        },
        onError: (t) => { error.textContent = t; },
      });
      hangUp.disabled = false;
    } catch (e) {
      error.textContent = e.message;
      talk.disabled = false;
    }
  } }, 'Talk');
  leaving.push(() => { if (call) call.hangUp(); call = null; });
  main.replaceChildren(
    h('p', {}, h('a', { href: '#/agents' }, '← agents')),
    h('h1', {}, 'Talk to ' + agent),
    h('p', { class: 'hint' }, 'Starts a session with transport "webrtc" and connects this browser\'s microphone and speaker to the bot ' +
      'through the session proxy (the bot must use Pipecat\'s SmallWebRTCTransport, like examples/webrtc-echo). Hang up ends the call; the session ends when the bot sees the peer leave.'),
    h('div', { class: 'card' }, h('p', {}, talk, ' ', hangUp), h('p', {}, 'Call: ', state, ' ', session), h('p', {}, stats), error, audio));
}
