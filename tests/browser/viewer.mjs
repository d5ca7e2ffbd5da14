// End-to-end test of the viewer page in a real headless Chromium against the real gateway
// binary (run by tests/it/viewer.rs, which provides the store and NATS prefix):
//
//   A. deltas appended over HTTP appear in the DOM without a reload (messages, a tool call
//      paired with its result, an internal message behind its toggle, the state tree, the
//      run's status and tokens, the version);
//   B. the gateway is killed (SIGKILL) and restarted mid-run while more deltas are appended:
//      the page resumes and shows every message exactly once, in order;
//   C. the page's position falls behind what the gateway can replay (its reconnects are held
//      back while more than 1,000 writes happen): it gets `reset`, reloads, and again shows
//      every message exactly once (in buffered mode the log still holds those writes for two
//      minutes, so the same position is replayed from the log instead);
//   D. it is live again afterwards;
//   E. at phone width the thread fills the screen without sideways scrolling, and the list is
//      reachable and usable from the keyboard;
//   and no console error happened except the network errors of the deliberate outages.
//
//   node tests/browser/viewer.mjs --bin target/debug/threadgate --store file:/tmp/x \
//     [--nats-url URL --nats-prefix P] --chromium /usr/bin/chromium \
//     --modules ~/.cache/threadgate-test/node/node_modules [--shot docs/viewer.png]

import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { createRequire } from 'node:module';
import { args, assert, until } from './lib.mjs';

const opt = args();
const require = createRequire(`${opt.modules}/`);
const { chromium } = require('playwright-core');

/** Writes appended in phase C: more than the 1,000 the store keeps for replay. */
const BEHIND = 1_005;
/** Appends in flight at once in phase C. */
const CONCURRENCY = 4;
const buffered = Boolean(opt['nats-url']);
const started = Date.now();
const step = (what) => console.log(`[viewer ${buffered ? 'buffered' : 'direct'}] +${((Date.now() - started) / 1000).toFixed(1)}s ${what}`);

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const port = await freePort();
const base = `http://127.0.0.1:${port}`;
let gateway = null;
const gatewayLog = [];

async function startGateway() {
  const argv = ['--listen', `127.0.0.1:${port}`, '--store', opt.store, '--log-format', 'json'];
  if (buffered) argv.push('--nats-url', opt['nats-url'], '--nats-prefix', opt['nats-prefix']);
  const child = spawn(opt.bin, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  const keep = (chunk) => {
    gatewayLog.push(...chunk.toString().split('\n').filter(Boolean));
    gatewayLog.splice(0, Math.max(0, gatewayLog.length - 200));
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  child.exited = new Promise((r) => child.once('exit', r));
  gateway = child;
  await until('the gateway to answer /healthz', async () => {
    try {
      return (await fetch(`${base}/healthz`)).ok;
    } catch {
      return false;
    }
  });
}

async function killGateway() {
  gateway.kill('SIGKILL');
  await gateway.exited;
}

async function api(method, path, body) {
  const res = await fetch(base + path, {
    method, headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined, signal: AbortSignal.timeout(30_000),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

const id = `viewer-${buffered ? 'buffered' : 'direct'}`;
const say = (n, extra = {}) => ({
  run_id: 'r1', reason: 'AssistantTurnCommitted',
  messages: [{ id: `m-${n}`, role: 'assistant', content: `message ${n}` }],
  patches: [{ patch: { ops: [{ op: 'increment', path: ['steps'], amount: 1 }] } }],
  ...extra,
});
const append = (d) => api('POST', `/v1/threads/${id}/deltas`, d);
const serverIds = async () => {
  const ids = [];
  let after;
  for (;;) {
    const q = new URLSearchParams({ limit: '200', visibility: 'any', view: 'live' });
    if (after !== undefined) q.set('after', String(after));
    const page = await api('GET', `/v1/threads/${id}/messages?${q}`);
    ids.push(...page.messages.map((m) => m.id));
    if (!page.has_more) return ids;
    after = page.next_cursor;
  }
};

let browser;
let outage = false;
const consoleErrors = [];
try {
  await startGateway();
  step(`gateway on ${base}`);
  await api('POST', '/v1/threads', { id, resource_id: 'viewer-test', metadata: { title: 'Weather agent' }, state: { steps: 0 } });

  browser = await chromium.launch({
    executablePath: opt.chromium,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push({ text: m.text(), outage });
  });
  page.on('pageerror', (e) => consoleErrors.push({ text: `pageerror: ${e.message}`, outage: false, fatal: true }));
  let navigations = 0;
  page.on('framenavigated', (f) => {
    if (f === page.mainFrame()) navigations++;
  });
  const domIds = () => page.$$eval('#messages [data-index]', (els) => els.map((e) => e.dataset.id));
  const status = () => page.$eval('#status', (e) => e.dataset.state);
  const logKinds = () => page.$$eval('#log li', (els) => els.map((e) => e.dataset.kind));
  const waitDom = async (what, want) => {
    await until(what, async () => {
      const got = await domIds();
      return got.length === want.length && got.every((x, i) => x === want[i]);
    }, 60_000).catch(async (e) => {
      const got = await domIds();
      throw new Error(`${e.message}: the page shows ${got.length} messages (${got.slice(-5)}), the gateway has ${want.length} (${want.slice(-5)})`);
    });
  };

  await page.goto(`${base}/#thread=${id}`);
  await page.evaluate(() => {
    window.__notReloaded = true;
  });
  await until('the page to go live', async () => (await status()) === 'live');
  step('page live');

  // ---- A: live updates -----------------------------------------------------------------
  await append({
    run_id: 'r1', reason: 'UserMessage', messages: [{ id: 'm-1', role: 'user', content: 'What is the weather in Paris?' }], patches: [],
  });
  await append({
    run_id: 'r1', reason: 'AssistantTurnCommitted',
    run_meta: { agent_id: 'weather', origin: 'user', status: 'running', input_tokens: 120, output_tokens: 18 },
    messages: [{ id: 'm-2', role: 'assistant', content: 'Let me check.', tool_calls: [{ id: 'c1', name: 'get_weather', arguments: { city: 'Paris', units: 'metric' } }] }],
    patches: [{ patch: { ops: [{ op: 'set', path: ['city'], value: 'Paris' }] } }],
  });
  await append({
    run_id: 'r1', reason: 'ToolResultsCommitted',
    messages: [{ id: 'm-3', role: 'tool', tool_call_id: 'c1', content: '{"temp": 18.5, "sky": "cloudy"}' }],
    patches: [{ patch: { ops: [{ op: 'append', path: ['readings'], value: { temp: 18.5 } }] } }],
  });
  await append({
    run_id: 'r1', reason: 'AssistantTurnCommitted',
    messages: [{ id: 'm-4', role: 'assistant', content: 'thinking: metric units', visibility: 'internal' }], patches: [],
  });
  for (let n = 5; n <= 9; n++) await append(say(n));
  await append(say(10, {
    run_meta: { agent_id: 'weather', origin: 'user', status: 'done', input_tokens: 260, output_tokens: 41 },
    messages: [{ id: 'm-10', role: 'assistant', content: 'It is 18.5 °C and cloudy in Paris.' }],
  }));
  const want = Array.from({ length: 10 }, (_, i) => `m-${i + 1}`);
  await waitDom('the first ten messages', want);
  const head = (await api('GET', `/v1/threads/${id}?view=live`)).version;
  await until('the version shown', async () => (await page.textContent('#version')) === `v${head}`);
  assert((await page.textContent('.result[data-call-id="c1"] .content')).includes('cloudy'), 'the tool result sits under its call');
  assert(!(await page.isVisible('#messages [data-id="m-4"]')), 'internal messages are hidden by default');
  await page.check('#show-internal');
  assert(await page.isVisible('#messages [data-id="m-4"]'), 'the toggle shows internal messages');
  await until('the state tree', async () => (await page.textContent('#state-tree')).includes('steps: 6'));
  await until('the run record', async () => {
    const row = await page.textContent('#runs tr[data-run="r1"]').catch(() => '');
    return row.includes('done') && row.includes('260') && row.includes('41');
  });
  assert(await page.evaluate(() => window.__notReloaded === true), 'no reload');
  if (opt.shot) {
    await page.uncheck('#show-internal');
    await page.screenshot({ path: opt.shot });
    step(`screenshot ${opt.shot}`);
  }
  step('A: live updates shown');

  // ---- B: kill and restart mid-run ------------------------------------------------------
  outage = true;
  await killGateway();
  await until('the page to notice', async () => (await status()) === 'reconnecting');
  await startGateway();
  for (let n = 11; n <= 20; n++) await append(say(n));
  await waitDom('every message once after the restart', await serverIds());
  await until('live again', async () => (await status()) === 'live');
  outage = false;
  assert((await domIds()).length === 20, 'twenty messages');
  step('B: resumed after kill -9 and restart');

  // ---- C: fall behind what can be replayed -------------------------------------------------
  outage = true;
  await page.route('**/events?**', (route) => route.abort());
  await killGateway();
  await until('the page to notice', async () => (await status()) === 'reconnecting');
  await startGateway();
  let next = 21;
  const last = 20 + BEHIND;
  await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
    while (next <= last) await append(say(next++));
  }));
  if (buffered) await api('POST', `/v1/threads/${id}/flush`);
  step(`C: ${BEHIND} writes while the page could not reconnect`);
  await page.unroute('**/events?**');
  const all = await serverIds();
  assert(all.length === 20 + BEHIND, `the gateway has ${all.length} messages`);
  await waitDom('every message once after falling behind', all);
  await until('live again', async () => (await status()) === 'live');
  outage = false;
  const kinds = await logKinds();
  if (!buffered) assert(kinds.includes('reset'), `the page went through reset (log: ${kinds.slice(0, 8)})`);
  step(`C: recovered (${kinds.includes('reset') ? 'reset and reload' : 'replayed'})`);

  // ---- D: live again ---------------------------------------------------------------------
  await append(say(last + 1));
  await waitDom('the next live message', [...all, `m-${last + 1}`]);
  assert(await page.evaluate(() => window.__notReloaded === true), 'never reloaded');
  assert(navigations === 1, `one navigation, saw ${navigations}`);

  // ---- E: a phone-width screen and the keyboard -----------------------------------------
  await page.setViewportSize({ width: 375, height: 740 });
  const overflow = await page.evaluate(() => document.scrollingElement.scrollWidth - window.innerWidth);
  assert(overflow <= 0, `no sideways scrolling at phone width (${overflow}px too wide)`);
  assert(!(await page.isVisible('#list-pane')) && (await page.isVisible('.back')), 'the thread takes the screen, with a way back');
  await page.click('.back');
  await until('the list on a phone', () => page.isVisible('#threads a[data-id]'));
  // From the top of the page, Tab reaches the thread's link, and Enter opens it.
  await page.evaluate(() => document.activeElement?.blur());
  let reached = false;
  for (let i = 0; i < 15 && !reached; i++) {
    await page.keyboard.press('Tab');
    reached = await page.evaluate((tid) => document.activeElement?.dataset?.id === tid, id);
  }
  assert(reached, 'the thread link is keyboard reachable');
  await page.keyboard.press('Enter');
  await until('the thread opened from the keyboard', async () => (await domIds()).length === all.length + 1
    && (await status()) === 'live');
  step('E: phone width and keyboard');

  // Only network errors of the deliberate outages may reach the console.
  const bad = consoleErrors.filter((e) => e.fatal || !e.outage || !/net::ERR_|Failed to load resource/.test(e.text));
  assert(bad.length === 0, `console errors: ${JSON.stringify(bad)}`);
  step(`done; ${consoleErrors.length} console errors, all network errors during the outages`);
  console.log('viewer test passed');
} catch (e) {
  console.error(e);
  console.error('--- last gateway log lines ---');
  console.error(gatewayLog.slice(-30).join('\n'));
  process.exitCode = 1;
} finally {
  await browser?.close();
  if (gateway && gateway.exitCode === null) {
    gateway.kill('SIGTERM');
    await Promise.race([gateway.exited, new Promise((r) => setTimeout(r, 10_000))]);
    if (gateway.exitCode === null) gateway.kill('SIGKILL');
  }
}
