// The viewer page at `/`: a thread list and one thread followed live, built on
// threadgate.js. No framework and no build step; all text goes in through textContent.
//
// State lives in the URL fragment (`#resource_id=u1&order=updated_at:desc&thread=t1`) so a
// view can be bookmarked and the back button works.

import { Client, follow, JsonFloat } from './threadgate.js';

/** Thread list page size. */
const PAGE = 25;
/** How often the first page of the list refreshes itself. */
const LIST_REFRESH_MS = 15_000;
/** Entries kept in the connection log. */
const LOG_MAX = 50;
/** Array items and object keys shown per level of the state tree. */
const TREE_MAX_ITEMS = 200;

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const TOKEN_KEY = 'threadgate.token';
const token = () => sessionStorage.getItem(TOKEN_KEY) || undefined;
const client = new Client({ token });

// ---------------------------------------------------------------------------------------------
// URL state
// ---------------------------------------------------------------------------------------------

function route() {
  const p = new URLSearchParams(location.hash.slice(1));
  return {
    resource_id: p.get('resource_id') || '',
    order: p.get('order') || 'updated_at:desc',
    thread: p.get('thread') || '',
  };
}

function href(patch) {
  const r = { ...route(), ...patch };
  const p = new URLSearchParams();
  if (r.resource_id) p.set('resource_id', r.resource_id);
  if (r.order !== 'updated_at:desc') p.set('order', r.order);
  if (r.thread) p.set('thread', r.thread);
  return `#${p.toString()}`;
}

// ---------------------------------------------------------------------------------------------
// Thread list
// ---------------------------------------------------------------------------------------------

const list = { cursors: [undefined], page: 0, next: undefined, key: '' };

function ago(ms) {
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

async function loadList() {
  const r = route();
  const key = `${r.resource_id}|${r.order}`;
  if (key !== list.key) Object.assign(list, { cursors: [undefined], page: 0, key });
  const [order_by, order] = r.order.split(':');
  const err = $('list-error');
  try {
    const res = await client.listThreads({
      resource_id: r.resource_id || undefined, order_by, order, limit: PAGE,
      cursor: list.cursors[list.page],
    });
    err.hidden = true;
    list.next = res.has_more ? res.next_cursor : undefined;
    renderList(res.threads, r.thread);
  } catch (e) {
    err.textContent = `Could not list threads: ${e.message}`;
    err.hidden = false;
  }
  $('prev').disabled = list.page === 0;
  $('next').disabled = !list.next;
}

function renderList(threads, current) {
  const ul = $('threads');
  ul.replaceChildren(...threads.map((t) => {
    const li = el('li');
    const a = el('a', 'thread-link');
    a.href = href({ thread: t.id });
    a.dataset.id = t.id;
    if (t.id === current) a.setAttribute('aria-current', 'page');
    const title = typeof t.metadata?.title === 'string' ? t.metadata.title : t.id;
    a.append(el('span', 'title', title));
    const meta = el('span', 'meta');
    const when = el('time', '', ago(Number(t.updated_at)));
    when.dateTime = new Date(Number(t.updated_at)).toISOString();
    when.title = `last update ${when.dateTime}`;
    meta.append(el('span', 'version', `v${t.version}`), when,
      el('span', 'count', `${t.message_count} msg`));
    if (t.resource_id) meta.append(el('span', 'resource', t.resource_id));
    a.append(meta);
    li.append(a);
    return li;
  }));
  if (!threads.length) ul.append(el('li', 'empty', 'No threads.'));
}

// ---------------------------------------------------------------------------------------------
// One thread, live
// ---------------------------------------------------------------------------------------------

let following = null;
let view = null; // the last ThreadView
let scheduled = false;
const rendered = { messages: null, count: 0, calls: new Map(), stateRef: null, runsKey: '' };
const openPaths = new Set(['$']);

function open(id) {
  following?.close();
  following = null;
  view = null;
  Object.assign(rendered, { messages: null, count: 0, calls: new Map(), stateRef: null, runsKey: '' });
  $('messages').replaceChildren();
  $('state-tree').replaceChildren();
  $('runs').tBodies[0].replaceChildren();
  $('log').replaceChildren();
  document.body.classList.toggle('has-thread', Boolean(id));
  $('empty').hidden = Boolean(id);
  $('thread').hidden = !id;
  if (!id) return;
  $('thread-title').textContent = id;
  $('version').textContent = '';
  following = follow(id, {
    token,
    onThread: (t) => {
      view = t;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(() => {
          scheduled = false;
          renderThread();
        });
      }
    },
    onStatus: renderStatus,
    onEvent: (e) => {
      if (e.type === 'reset') log('reset', `reset: reloading at v${e.version}`);
      if (e.type === 'flushed') log('flushed', `flushed to the store up to v${e.version}`);
      if (e.type === 'deleted') log('deleted', 'thread deleted');
      if (e.type === 'load') log('load', `loaded snapshot at v${e.version}`);
    },
  });
}

function log(kind, text) {
  const li = el('li', '', text);
  li.dataset.kind = kind;
  const t = el('time', '', new Date().toLocaleTimeString());
  li.prepend(t, ' ');
  const ol = $('log');
  ol.prepend(li);
  while (ol.children.length > LOG_MAX) ol.lastChild.remove();
}

const STATE_TEXT = {
  connecting: 'connecting',
  live: 'live',
  reconnecting: 'reconnecting',
  reset: 'reset: reloading',
  deleted: 'deleted',
  not_found: 'not found',
  unauthorized: 'not authorized (set a token)',
  closed: 'closed',
};

let lastState = '';
function renderStatus(s) {
  const box = $('status');
  box.dataset.state = s.state;
  box.dataset.mode = s.mode || '';
  box.dataset.pending = String(s.pending);
  $('status-text').textContent = STATE_TEXT[s.state] + (s.state === 'reconnecting' && s.attempt ? ` (attempt ${s.attempt})` : '');
  let store = '';
  if (s.mode === 'direct') store = 'direct: every write is in the store';
  else if (s.mode === 'buffered' && s.stored !== null) {
    store = s.pending ? `${s.pending} buffered, not yet folded (store at v${s.stored})` : `flushed to the store (v${s.stored})`;
  }
  $('store-text').textContent = store;
  if (s.state !== lastState) {
    log(s.state, STATE_TEXT[s.state] + (s.error ? `: ${s.error}` : ''));
    lastState = s.state;
  }
}

function renderThread() {
  if (!view) return;
  $('version').textContent = `v${view.version}`;
  const title = view.metadata?.title;
  $('thread-title').textContent = typeof title === 'string' ? `${title} (${view.id})` : view.id;
  renderMessages();
  // The list refreshes on a timer; the followed thread's entry keeps up at once.
  for (const a of document.querySelectorAll('#threads a[data-id]')) {
    if (a.dataset.id !== view.id) continue;
    a.querySelector('.version').textContent = `v${view.version}`;
    a.querySelector('.count').textContent = `${view.messages.length} msg`;
  }
  if (view.state !== rendered.stateRef) {
    rendered.stateRef = view.state;
    $('state-tree').replaceChildren(tree(view.state, '$', 'state'));
  }
  renderRuns();
}

/** Appends new messages; a replaced message list (a reload) is drawn again. */
function renderMessages() {
  const ol = $('messages');
  const msgs = view.messages;
  if (msgs !== rendered.messages || msgs.length < rendered.count) {
    ol.replaceChildren();
    rendered.messages = msgs;
    rendered.count = 0;
    rendered.calls = new Map();
  }
  const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
  for (let i = rendered.count; i < msgs.length; i++) {
    const m = msgs[i];
    const result = m.role === 'tool' && m.tool_call_id ? rendered.calls.get(m.tool_call_id) : null;
    if (result) {
      result.replaceChildren(messageBody(m, i));
      result.classList.remove('pending');
      result.closest('li').dataset.results = String(Number(result.closest('li').dataset.results || 0) + 1);
      // Keep one DOM node per message, so counting `[data-index]` counts messages.
      const marker = el('li', 'paired');
      marker.dataset.index = String(i);
      if (m.id !== undefined) marker.dataset.id = m.id;
      marker.dataset.role = 'tool';
      marker.hidden = true;
      ol.append(marker);
      continue;
    }
    ol.append(messageItem(m, i));
  }
  rendered.count = msgs.length;
  if (atBottom && msgs.length) window.scrollTo(0, document.body.scrollHeight);
}

function messageBody(m, i) {
  const body = el('div', 'body');
  const head = el('div', 'who');
  head.append(el('span', 'role', m.role));
  if (m.visibility === 'internal') head.append(el('span', 'badge', 'internal'));
  if (m.metadata?.run_id) head.append(el('span', 'run', m.metadata.run_id));
  head.append(el('span', 'cursor', `#${i}`));
  body.append(head, el('div', 'content', m.content));
  return body;
}

function messageItem(m, i) {
  const li = el('li', `msg role-${m.role}`);
  li.dataset.index = String(i);
  li.dataset.role = m.role;
  if (m.id !== undefined) li.dataset.id = m.id;
  if (m.visibility === 'internal') li.classList.add('internal');
  li.append(messageBody(m, i));
  for (const call of m.tool_calls || []) {
    const box = el('div', 'call');
    const head = el('div', 'call-head');
    head.append(el('span', 'badge', 'tool call'), el('code', '', call.name), el('span', 'call-id', call.id));
    const args = el('details', 'args');
    args.append(el('summary', '', 'arguments'), tree(call.arguments, null, 'arguments'));
    const result = el('div', 'result pending', 'waiting for the result');
    result.dataset.callId = call.id;
    rendered.calls.set(call.id, result);
    box.append(head, args, result);
    li.append(box);
  }
  return li;
}

function renderRuns() {
  const key = view.runs.map((r) => `${r.run_id}@${r.version}`).join('|');
  if (key === rendered.runsKey) return;
  rendered.runsKey = key;
  const rows = view.runs.map((r) => {
    const tr = el('tr');
    tr.dataset.run = r.run_id;
    const status = el('span', `badge status-${r.meta.status}`, r.meta.status);
    const cells = [r.run_id, r.meta.agent_id, status, String(r.meta.input_tokens), String(r.meta.output_tokens), `v${r.version}`];
    for (const c of cells) {
      const td = el('td');
      td.append(c);
      tr.append(td);
    }
    return tr;
  });
  $('runs').tBodies[0].replaceChildren(...rows);
  if (!rows.length) {
    const tr = el('tr');
    const td = el('td', 'empty', 'No runs recorded.');
    td.colSpan = 6;
    tr.append(td);
    $('runs').tBodies[0].append(tr);
  }
}

// ---------------------------------------------------------------------------------------------
// Collapsible JSON tree (<details> elements: keyboard and screen-reader friendly as they are)
// ---------------------------------------------------------------------------------------------

function scalar(v) {
  if (v === null) return el('span', 'j-null', 'null');
  if (typeof v === 'boolean') return el('span', 'j-bool', String(v));
  if (typeof v === 'string') return el('span', 'j-str', JSON.stringify(v));
  if (v instanceof JsonFloat || typeof v === 'number' || typeof v === 'bigint') {
    return el('span', 'j-num', String(v));
  }
  return null;
}

/** @param {string|null} path identity of the node, to keep it open across redraws */
function tree(v, path, label) {
  const s = scalar(v);
  if (s) {
    const row = el('div', 'j-row');
    if (label !== null) row.append(el('span', 'j-key', `${label}: `));
    row.append(s);
    return row;
  }
  const isArr = Array.isArray(v);
  const keys = isArr ? v.map((_, i) => i) : Object.keys(v);
  const d = el('details', 'j-node');
  const sum = el('summary');
  if (label !== null) sum.append(el('span', 'j-key', `${label}: `));
  sum.append(el('span', 'j-type', isArr ? `[${keys.length}]` : `{${keys.length}}`));
  d.append(sum);
  if (path !== null) {
    d.dataset.path = path;
    d.open = openPaths.has(path);
    d.addEventListener('toggle', () => {
      if (d.open) openPaths.add(path);
      else openPaths.delete(path);
    });
  }
  // Children are built when first opened, so a large closed subtree costs nothing.
  const fill = () => {
    if (d.dataset.filled) return;
    d.dataset.filled = '1';
    const box = el('div', 'j-children');
    for (const k of keys.slice(0, TREE_MAX_ITEMS)) {
      box.append(tree(v[k], path === null ? null : `${path}/${k}`, String(k)));
    }
    if (keys.length > TREE_MAX_ITEMS) box.append(el('div', 'j-more', `… ${keys.length - TREE_MAX_ITEMS} more`));
    d.append(box);
  };
  if (d.open) fill();
  d.addEventListener('toggle', () => d.open && fill());
  return d;
}

// ---------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------

let current = null;
function onRoute() {
  const r = route();
  $('resource').value = r.resource_id;
  $('order').value = r.order;
  if (r.thread !== current) {
    current = r.thread;
    open(r.thread);
    if (r.thread) $('thread-pane').focus({ preventScroll: true });
  }
  loadList();
}

$('filter').addEventListener('submit', (e) => {
  e.preventDefault();
  location.hash = href({ resource_id: $('resource').value.trim(), order: $('order').value });
});
$('order').addEventListener('change', () => {
  location.hash = href({ order: $('order').value });
});
$('next').addEventListener('click', () => {
  if (!list.next) return;
  list.cursors[list.page + 1] = list.next;
  list.page += 1;
  loadList();
});
$('prev').addEventListener('click', () => {
  if (list.page === 0) return;
  list.page -= 1;
  loadList();
});
$('refresh').addEventListener('click', () => loadList());
$('show-internal').addEventListener('change', (e) => {
  $('messages').classList.toggle('show-internal', e.target.checked);
});
$('token').value = token() || '';
$('token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const t = $('token').value.trim();
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
  current = null;
  onRoute();
});
window.addEventListener('hashchange', onRoute);
setInterval(() => {
  if (list.page === 0 && document.visibilityState === 'visible') loadList();
}, LIST_REFRESH_MS);
onRoute();
