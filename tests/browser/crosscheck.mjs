// Cross-check: the same seeded random delta sequences go to a real gateway (over HTTP) and to
// threadgate.js's ThreadMirror; after every delta the accept/reject decision must agree (for a
// rejection: the same problem `code` and `field`, and for a patch failure the same message),
// and every few deltas and at the end the gateway's thread (messages, base state, patches,
// current state, runs, version) must equal the module's, field by field with the gateway's
// notion of JSON equality (1 and 1.0 differ). A `follow()` of the same thread must end with
// the same copy.
//
//   node tests/browser/crosscheck.mjs --base http://127.0.0.1:PORT --seeds 1,2,3 --steps 150
//
// Exits non-zero on the first disagreement, printing the seed, step and delta to replay it.

import { args, assert, loadModule, rng, until } from './lib.mjs';

const tg = await loadModule();
const { JsonFloat, parse, stringify, jsonEqual, ThreadMirror, ValidationError, follow } = tg;
const opt = args();
const BASE = opt.base;
const SEEDS = (opt.seeds || '1').split(',').map(Number);
const STEPS = Number(opt.steps || 150);
const COMPARE_EVERY = 10;

const KEYS = ['a', 'b', 'c', 'n', '__proto__', 'constructor', '0', 'k k', 'é'];
const STRINGS = ['', 'x', 'héllo', 'nul\u0000here', '😀', '1', 'line\nbreak'];

function gen(r) {
  const int = () => r.pick([0, 1, 2, -3, 7, 41, 2 ** 40, 9007199254740993n, 9223372036854775807n,
    -9223372036854775808n, 9223372036854775806n]);
  const float = () => r.pick([0.5, -1.25, 0.1, 2.75, new JsonFloat(3), new JsonFloat(1e16),
    new JsonFloat(-0), 1.7e308, -1.7e308, 1e-7]);
  const scalar = () => {
    switch (r.int(6)) {
      case 0: return null;
      case 1: return r.chance(0.5);
      case 2: return int();
      case 3: return float();
      default: return r.pick(STRINGS);
    }
  };
  const value = (depth = 0) => {
    if (depth > 2 || r.chance(0.55)) return scalar();
    if (r.chance(0.5)) return Array.from({ length: r.int(4) }, () => value(depth + 1));
    const o = {};
    for (let i = r.int(4); i > 0; i--) {
      const k = r.pick(KEYS);
      if (k === '__proto__') Object.defineProperty(o, k, { value: value(depth + 1), enumerable: true, writable: true, configurable: true });
      else o[k] = value(depth + 1);
    }
    return o;
  };
  return { int, float, scalar, value };
}

/** A path into `state`: mostly along what exists (so ops succeed), sometimes off it. */
function randomPath(r, state) {
  const path = [];
  let cur = state;
  const depth = r.int(4);
  for (let d = 0; d < depth; d++) {
    if (Array.isArray(cur) && cur.length && r.chance(0.8)) {
      const i = r.chance(0.85) ? r.int(cur.length) : cur.length + r.int(2);
      path.push(i);
      cur = cur[i];
    } else if (cur && typeof cur === 'object' && !Array.isArray(cur) && !(cur instanceof JsonFloat)
      && Object.keys(cur).length && r.chance(0.8)) {
      const k = r.pick(Object.keys(cur));
      path.push(k);
      cur = cur[k];
    } else {
      path.push(r.chance(0.8) ? r.pick(KEYS) : r.int(3));
      cur = undefined;
    }
  }
  return path;
}

/** Every path in `state` whose value passes `test` (for ops that need a target of a kind). */
function pathsWhere(state, test, at = [], out = []) {
  if (test(state)) out.push(at);
  if (Array.isArray(state)) state.forEach((v, i) => pathsWhere(v, test, [...at, i], out));
  else if (state && typeof state === 'object' && !(state instanceof JsonFloat)) {
    for (const k of Object.keys(state)) pathsWhere(state[k], test, [...at, k], out);
  }
  return out;
}

const isNum = (v) => typeof v === 'number' || typeof v === 'bigint' || v instanceof JsonFloat;

function randomOp(r, g, state) {
  const op = r.pick(tg.OPS);
  const o = { op, path: randomPath(r, state) };
  // Mostly aim the ops that need a target of a kind at one (so they succeed and are compared
  // by their result), and sometimes not (so they fail and are compared by their error).
  const want = { increment: isNum, decrement: isNum, insert: Array.isArray, remove: Array.isArray,
    append: Array.isArray }[op];
  if (want && r.chance(0.75)) {
    const paths = pathsWhere(state, want);
    if (paths.length) o.path = r.pick(paths);
  }
  if (op === 'increment' || op === 'decrement') o.amount = r.chance(0.6) ? r.pick([1, 2, -1, 5]) : r.chance(0.5) ? g.int() : g.float();
  else if (op === 'remove' && r.chance(0.6)) {
    const target = o.path.reduce((v, k) => (v == null ? v : v[k]), state);
    o.value = Array.isArray(target) && target.length ? r.pick(target) : g.value();
  } else if (op === 'insert') {
    o.index = r.chance(0.8) ? r.int(3) : r.int(6);
    o.value = g.value();
  } else if (op === 'merge_object') {
    o.value = r.chance(0.85) ? { [r.pick(KEYS)]: g.value(), [r.pick(KEYS)]: g.scalar() } : g.value();
  } else if (op !== 'delete') o.value = g.value();
  return o;
}

const ROLES = ['user', 'assistant', 'system', 'tool'];

function randomMessage(r, g) {
  const m = { role: r.pick(ROLES), content: r.pick(STRINGS) + r.int(100) };
  if (r.chance(0.6)) m.id = `m${r.int(25)}`;
  if (r.chance(0.15)) m.visibility = r.pick(['internal', 'all']);
  if (r.chance(0.2)) m.tool_calls = r.chance(0.2) ? [] : [{ id: `c${r.int(5)}`, name: 'tool', arguments: g.value(), ignored: 1 }];
  if (r.chance(0.15)) m.tool_call_id = `c${r.int(5)}`;
  if (r.chance(0.3)) m.metadata = r.chance(0.2) ? {} : { run_id: `r${r.int(3)}`, step_index: r.int(9), extra_key: g.value() };
  if (r.chance(0.1)) m.unknown_field = g.value();
  return m;
}

/** One way to break a delta's shape (the gateway answers 400 before applying anything). */
function breakShape(r, d) {
  const at = r.int(8);
  const op = () => {
    if (!d.patches.length) d.patches.push({ patch: { ops: [{ op: 'set', path: [], value: 1 }] } });
    const ops = d.patches[0].patch.ops;
    if (!ops.length) ops.push({ op: 'set', path: [], value: 1 });
    return ops[0];
  };
  switch (at) {
    case 0: op().op = 'frobnicate'; break;
    case 1: op().path = ['a', -1]; break;
    case 2: op().path = [1.5]; break;
    case 3: { const o = op(); o.op = 'increment'; o.amount = 'one'; break; }
    case 4: { const o = op(); o.op = 'insert'; o.index = -1; o.value = 1; break; }
    case 5: { const o = op(); o.op = 'set'; delete o.value; break; }
    case 6: d.messages.push({ role: 'bot', content: 'x' }); break;
    default: d.messages.push({ role: 'user', content: 'x', metadata: { step_index: new JsonFloat(1) } });
  }
}

function randomDelta(r, g, mirror) {
  const d = {
    run_id: `r${r.int(3)}`,
    reason: r.pick(['UserMessage', 'AssistantTurnCommitted', 'ToolResultsCommitted', 'AssistantTurnCommitted']),
    messages: Array.from({ length: r.int(3) }, () => randomMessage(r, g)),
    patches: [],
  };
  for (let p = r.int(3); p > 0; p--) {
    d.patches.push({ patch: { ops: Array.from({ length: 1 + r.int(2) }, () => randomOp(r, g, mirror.current)) } });
  }
  if (r.chance(0.2)) d.patches.forEach((p) => { p.id = `p${r.int(9)}`; p.timestamp = r.int(1e6); });
  if (r.chance(0.05)) d.snapshot = r.chance(0.8) ? { a: g.value(), n: 1 } : null;
  if (r.chance(0.25)) {
    d.run_meta = {
      agent_id: 'agent', origin: r.pick(['user', 'subagent']), status: r.pick(['running', 'waiting', 'done']),
      input_tokens: r.int(5000), output_tokens: r.chance(0.1) ? 18446744073709551615n : r.int(900),
    };
    if (r.chance(0.3)) d.parent_run_id = `p${r.int(2)}`;
  }
  if (r.chance(0.08)) d.extra_field = g.value();
  if (r.chance(0.08)) breakShape(r, d);
  return d;
}

/** The first place two JSON values differ (gateway equality), for a readable failure. */
function firstDiff(a, b, at = '$') {
  if (jsonEqual(a, b)) return null;
  if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) return `${at}: length ${a.length} vs ${b.length}`;
    for (let i = 0; i < a.length; i++) {
      const d = firstDiff(a[i], b[i], `${at}[${i}]`);
      if (d) return d;
    }
  }
  if (a && b && typeof a === 'object' && typeof b === 'object' && !Array.isArray(a) && !Array.isArray(b)) {
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
      const d = firstDiff(a[k], b[k], `${at}.${k}`);
      if (d) return d;
    }
  }
  return `${at}: gateway ${stringify(a)} vs module ${stringify(b)}`;
}

async function http(method, path, body) {
  const res = await fetch(BASE + path, {
    method, body, headers: body === undefined ? {} : { 'content-type': 'application/json' },
    signal: AbortSignal.timeout(30_000),
  });
  const text = await res.text();
  return { status: res.status, body: text ? parse(text) : null };
}

function runsOf(list) {
  return [...list].sort((x, y) => (x.run_id < y.run_id ? -1 : 1)).map((r) => ({
    run_id: r.run_id, parent_run_id: r.parent_run_id ?? null, meta: r.meta, version: r.version,
  }));
}

async function compare(id, mirror, where) {
  const t = (await http('GET', `/v1/threads/${id}?view=live`)).body;
  const s = (await http('GET', `/v1/threads/${id}/state?view=live`)).body;
  const runs = (await http('GET', `/v1/threads/${id}/runs?view=live`)).body;
  const v = mirror.view();
  const checks = [
    ['version', t.version, v.version],
    ['messages', t.messages, v.messages],
    ['base state', t.state, v.base_state],
    ['patches', t.patches, v.patches],
    ['current state', s.state, v.state],
    ['runs', runsOf(runs), runsOf(v.runs)],
  ];
  for (const [what, gw, mod] of checks) {
    const d = firstDiff(gw, mod);
    if (d) throw new Error(`${where}: ${what} differ: ${d}`);
  }
}

const totals = { deltas: 0, accepted: 0, rejected: {}, opsApplied: {}, opsRejected: {} };

for (const seed of SEEDS) {
  const r = rng(seed);
  const g = gen(r);
  const id = `xcheck-${seed}-${Date.now()}`;
  const created = await http('POST', '/v1/threads', stringify({ id, state: { n: 0, a: [1, new JsonFloat(2)], b: {} } }));
  assert(created.status === 201, `create: ${stringify(created.body)}`);
  const mirror = new ThreadMirror(created.body, created.body.version);
  const follower = follow(id, { baseUrl: BASE });
  for (let step = 1; step <= STEPS; step++) {
    const delta = randomDelta(r, g, mirror);
    const text = stringify(delta);
    const where = `seed ${seed} step ${step}`;
    let mod;
    try {
      mirror.applyDelta(parse(text));
      mod = { ok: true };
    } catch (e) {
      if (!(e instanceof ValidationError)) throw e;
      mod = { ok: false, code: e.code, field: e.field, detail: e.message };
    }
    const res = await http('POST', `/v1/threads/${id}/deltas`, text);
    totals.deltas++;
    const ops = delta.patches.flatMap((p) => p.patch?.ops ?? []).map((o) => o.op);
    if (res.status === 200) {
      if (!mod.ok) throw new Error(`${where}: the gateway accepted what the module rejected (${mod.detail})\n${text}`);
      assert(res.body.version === mirror.version, `${where}: version ${res.body.version} vs ${mirror.version}`);
      totals.accepted++;
      for (const o of ops) totals.opsApplied[o] = (totals.opsApplied[o] || 0) + 1;
    } else {
      const p = res.body;
      if (mod.ok) throw new Error(`${where}: the module accepted what the gateway rejected: ${stringify(p)}\n${text}`);
      const same = p.code === mod.code && p.field === mod.field && (p.code !== 'invalid_patch' || p.detail === mod.detail);
      if (!same) {
        throw new Error(`${where}: different rejections\n gateway: ${p.status} ${p.code} ${p.field} ${p.detail}\n module:  ${mod.code} ${mod.field} ${mod.detail}\n${text}`);
      }
      totals.rejected[p.code] = (totals.rejected[p.code] || 0) + 1;
      for (const o of ops) totals.opsRejected[o] = (totals.opsRejected[o] || 0) + 1;
    }
    if (step % COMPARE_EVERY === 0) await compare(id, mirror, where);
  }
  await compare(id, mirror, `seed ${seed} end`);
  // The live copy that follow() kept from the event stream agrees too.
  await until('follow() to reach the last version', () => follower.thread?.version === mirror.version);
  const fv = follower.thread;
  const mv = mirror.view();
  for (const k of ['messages', 'state', 'base_state', 'patches']) {
    const d = firstDiff(mv[k], fv[k]);
    if (d) throw new Error(`seed ${seed}: follow() ${k} differs from the mirror: ${d}`);
  }
  const d = firstDiff(runsOf(mv.runs), runsOf(fv.runs));
  if (d) throw new Error(`seed ${seed}: follow() runs differ: ${d}`);
  follower.close();
}

// A copy of an earlier life of the thread id: resuming it after the thread was deleted and
// created again (and written up to the same version) must go through `reset` to the new
// thread, never continue silently with the old copy. follow() sends the copy's incarnation.
{
  const id = `xcheck-life-${Date.now()}`;
  const write = async (text) => {
    const res = await http('POST', `/v1/threads/${id}/deltas`, stringify({
      run_id: 'r', reason: 'UserMessage', patches: [],
      messages: [{ id: `m-${text}`, role: 'user', content: text }],
    }));
    assert(res.status === 200, `append: ${stringify(res.body)}`);
  };
  assert((await http('POST', '/v1/threads', stringify({ id }))).status === 201, 'create');
  await write('first life');
  const old = (await http('GET', `/v1/threads/${id}?view=live`)).body;
  assert(typeof old.incarnation === 'string', 'a thread answer names its incarnation');
  assert((await http('DELETE', `/v1/threads/${id}`)).status === 204, 'delete');
  assert((await http('POST', '/v1/threads', stringify({ id }))).status === 201, 're-create');
  await write('second life');
  const events = [];
  const follower = follow(id, {
    baseUrl: BASE, initial: { thread: old, version: old.version },
    onEvent: (e) => events.push(e.type),
  });
  await until('follow() to show the second life', () => follower.thread?.messages?.[0]?.content === 'second life');
  assert(events.includes('reset'), `the old copy went through reset (events: ${events})`);
  follower.close();
}

for (const op of tg.OPS) {
  assert(totals.opsApplied[op] > 0, `some accepted delta used ${op}`);
  assert(totals.opsRejected[op] > 0, `some rejected delta used ${op}`);
}
assert(totals.rejected.invalid_patch > 0 && totals.rejected.invalid_field > 0 && totals.rejected.unknown_op > 0,
  'rejections of every kind');
console.log(`crosscheck: ${stringify(totals)}`);
console.log(`${totals.deltas} deltas, ${totals.accepted} accepted, ${totals.deltas - totals.accepted} rejected: 0 disagreements`);
