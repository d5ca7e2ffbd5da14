// threadgate.js: a dependency-free ES module for browser frontends (and Node 18+) that talk
// to a threadgate gateway.
//
//   import { follow, Client } from 'https://gateway.example/static/threadgate.js';
//   const f = follow('thread-1', { baseUrl: 'https://gateway.example', token,
//     onThread: (t) => render(t), onStatus: (s) => showStatus(s) });
//   ...
//   f.close();
//
// What it does, and why it is shaped this way:
//
// * `follow()` loads the live snapshot, then streams the thread's events from the snapshot's
//   version and applies every `delta`, `snapshot` and `metadata` event to a local copy with
//   the server's rules (docs/wire.md: messages de-duplicated by id, all nine patch ops with their
//   exact failure cases, a snapshot replacing the state). It hands the UI the materialized
//   thread after every event. Positions are versions: an event at or below the version
//   already applied is dropped, one that skips a version makes the copy reload, so no event
//   is ever shown twice and none is silently missed. `reset` reloads and resumes; `deleted`
//   ends; a dropped or silent connection (keep-alive comments stop) reconnects with
//   `Last-Event-ID` and `after=` and backs off while the gateway is away.
// * The stream is read with `fetch()` rather than `EventSource`: EventSource hides HTTP
//   statuses (a 401, 404 or 503 all look like "error"), hides keep-alive comments (so a
//   half-open connection is never noticed), and waits seconds before reconnecting.
// * Numbers are parsed losslessly. JSON.parse turns `7.0` into `7` and rounds integers past
//   2^53, so the copy could not apply `increment` like the server (an integer plus an integer
//   stays an integer and overflow past i64 is an error; any float operand makes a float) nor
//   `remove` (`1` and `1.0` are different values). In values this module returns, an integer
//   is a `number` when it is a safe integer and a `bigint` beyond; a float is a `number` when
//   it has a fraction and a `JsonFloat` (which behaves as a number: `+x`, `x * 2`) when its
//   value is whole (`7.0`, `1e16`). Use `stringify()` (not JSON.stringify, which rejects
//   bigint) to write such values back exactly.
// * Tokens: REST calls send `Authorization: Bearer <token>`; the event stream passes it as
//   `?access_token=` (the way the gateway accepts it on the events endpoint; mind that
//   proxies may log query strings, so prefer short-lived tokens) unless
//   `tokenTransport: 'header'` is chosen. `token` may be a function returning the current
//   token (or a promise of it), so a refreshed JWT is picked up at the next request.

// ---------------------------------------------------------------------------------------------
// Lossless JSON
// ---------------------------------------------------------------------------------------------

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const U64_MAX = 2n ** 64n - 1n;
/** Deepest nesting `parse` accepts (the gateway's JSON reader stops at 128). */
const MAX_DEPTH = 512;

/** A JSON float whose value is whole (`7.0`, `1e16`, `-0.0`): kept apart from the integer. */
export class JsonFloat {
  /** @param {number} value */
  constructor(value) {
    /** @readonly */
    this.value = value;
    Object.freeze(this);
  }
  valueOf() {
    return this.value;
  }
  toString() {
    return floatText(this.value);
  }
  toJSON() {
    return this.value;
  }
}

/** A float value in this module's representation. @param {number} x */
function mkFloat(x) {
  return Number.isInteger(x) ? new JsonFloat(x) : x;
}

/** An integer value in this module's representation. @param {bigint} b */
function mkInt(b) {
  return b >= -9007199254740991n && b <= 9007199254740991n ? Number(b) : b;
}

/** @param {unknown} v */
function isInt(v) {
  return typeof v === 'bigint' || (typeof v === 'number' && Number.isSafeInteger(v));
}

/** @param {unknown} v */
function isFloat(v) {
  return v instanceof JsonFloat || (typeof v === 'number' && !Number.isSafeInteger(v));
}

/** @param {unknown} v */
function isNumber(v) {
  return typeof v === 'number' || typeof v === 'bigint' || v instanceof JsonFloat;
}

/** @param {unknown} v @returns {v is Record<string, unknown>} */
function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v) && !(v instanceof JsonFloat);
}

/** Sets an own property, also for the key `__proto__`. */
function setProp(obj, key, value) {
  if (key === '__proto__') {
    Object.defineProperty(obj, key, { value, writable: true, enumerable: true, configurable: true });
  } else {
    obj[key] = value;
  }
}

/** @param {object} obj @param {string} key */
function own(obj, key) {
  return Object.prototype.hasOwnProperty.call(obj, key);
}

class JsonSyntaxError extends SyntaxError {}

/**
 * Parses JSON text keeping integers and floats apart (see the module notes).
 * @param {string} text
 * @returns {any}
 */
export function parse(text) {
  let i = 0;
  const n = text.length;
  const fail = (why) => {
    throw new JsonSyntaxError(`${why} at offset ${i}`);
  };
  const ws = () => {
    for (;;) {
      const c = text.charCodeAt(i);
      if (c === 32 || c === 10 || c === 13 || c === 9) i++;
      else return;
    }
  };
  const str = () => {
    i++; // opening quote
    let out = '';
    let start = i;
    for (;;) {
      if (i >= n) fail('unterminated string');
      const c = text.charCodeAt(i);
      if (c === 34) {
        out += text.slice(start, i);
        i++;
        return out;
      }
      if (c < 32) fail('control character in string');
      if (c !== 92) {
        i++;
        continue;
      }
      out += text.slice(start, i);
      const e = text[i + 1];
      i += 2;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          const hex = text.slice(i, i + 4);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail('bad \\u escape');
          out += String.fromCharCode(parseInt(hex, 16));
          i += 4;
          break;
        }
        default:
          fail('bad escape');
      }
      start = i;
    }
  };
  const num = () => {
    const start = i;
    let frac = false;
    if (text[i] === '-') i++;
    if (text[i] === '0') i++;
    else if (text[i] >= '1' && text[i] <= '9') while (text[i] >= '0' && text[i] <= '9') i++;
    else fail('bad number');
    if (text[i] === '.') {
      frac = true;
      i++;
      if (!(text[i] >= '0' && text[i] <= '9')) fail('bad number');
      while (text[i] >= '0' && text[i] <= '9') i++;
    }
    if (text[i] === 'e' || text[i] === 'E') {
      frac = true;
      i++;
      if (text[i] === '+' || text[i] === '-') i++;
      if (!(text[i] >= '0' && text[i] <= '9')) fail('bad number');
      while (text[i] >= '0' && text[i] <= '9') i++;
    }
    const s = text.slice(start, i);
    if (!frac) {
      // Integers in [i64::MIN, u64::MAX] stay integers, as serde_json reads them; `-0` and
      // anything outside that range is a float.
      if (s === '-0') return new JsonFloat(-0);
      if (s.length < 16) return Number(s);
      const b = BigInt(s);
      if (b >= I64_MIN && b <= U64_MAX) return mkInt(b);
    }
    const f = Number(s);
    if (!Number.isFinite(f)) fail('number out of range');
    return mkFloat(f);
  };
  const value = (depth) => {
    if (depth > MAX_DEPTH) fail('nesting too deep');
    ws();
    const c = text[i];
    if (c === '{') {
      i++;
      const obj = {};
      ws();
      if (text[i] === '}') {
        i++;
        return obj;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail('expected a key');
        const k = str();
        ws();
        if (text[i] !== ':') fail('expected :');
        i++;
        setProp(obj, k, value(depth + 1));
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === '}') {
          i++;
          return obj;
        } else fail('expected , or }');
      }
    }
    if (c === '[') {
      i++;
      const arr = [];
      ws();
      if (text[i] === ']') {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(value(depth + 1));
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === ']') {
          i++;
          return arr;
        } else fail('expected , or ]');
      }
    }
    if (c === '"') return str();
    if (c === '-' || (c >= '0' && c <= '9')) return num();
    if (text.startsWith('true', i)) {
      i += 4;
      return true;
    }
    if (text.startsWith('false', i)) {
      i += 5;
      return false;
    }
    if (text.startsWith('null', i)) {
      i += 4;
      return null;
    }
    return fail('expected a value');
  };
  const v = value(0);
  ws();
  if (i !== n) fail('trailing characters');
  return v;
}

/** The JSON text of a float: always with a `.` or an exponent, so it reads back as a float. */
function floatText(x) {
  if (!Number.isFinite(x)) throw new RangeError(`${x} is not a JSON number`);
  if (Object.is(x, -0)) return '-0.0';
  const s = String(x);
  return /[.eE]/.test(s) ? s : `${s}.0`;
}

/**
 * JSON text of a value in this module's representation (integers and floats kept apart).
 * @param {unknown} v
 * @returns {string}
 */
export function stringify(v) {
  if (v === null || v === undefined) return 'null';
  switch (typeof v) {
    case 'boolean':
      return v ? 'true' : 'false';
    case 'string':
      return JSON.stringify(v);
    case 'bigint':
      return String(v);
    case 'number':
      return Number.isSafeInteger(v) ? String(v) : floatText(v);
    default:
  }
  if (v instanceof JsonFloat) return floatText(v.value);
  if (Array.isArray(v)) return `[${v.map(stringify).join(',')}]`;
  const parts = [];
  for (const k of Object.keys(v)) {
    if (v[k] !== undefined) parts.push(`${JSON.stringify(k)}:${stringify(v[k])}`);
  }
  return `{${parts.join(',')}}`;
}

/**
 * JSON equality as the gateway defines it: `1` and `1.0` differ, object key order does not
 * matter, and floats compare by value (`0.0 == -0.0`).
 * @param {unknown} a @param {unknown} b @returns {boolean}
 */
export function jsonEqual(a, b) {
  if (isNumber(a) || isNumber(b)) {
    if (!isNumber(a) || !isNumber(b)) return false;
    if (isInt(a) && isInt(b)) return BigInt(a) === BigInt(b);
    if (isFloat(a) && isFloat(b)) return Number(a) === Number(b);
    return false;
  }
  if (a === null || b === null || typeof a !== 'object' || typeof b !== 'object') return a === b;
  if (Array.isArray(a) || Array.isArray(b)) {
    if (!Array.isArray(a) || !Array.isArray(b) || a.length !== b.length) return false;
    return a.every((x, i) => jsonEqual(x, b[i]));
  }
  const ka = Object.keys(a);
  if (ka.length !== Object.keys(b).length) return false;
  return ka.every((k) => own(b, k) && jsonEqual(a[k], b[k]));
}

/** A deep copy (JsonFloat and bigint are immutable, so they are shared). */
function clone(v) {
  if (v === null || typeof v !== 'object' || v instanceof JsonFloat) return v;
  if (Array.isArray(v)) return v.map(clone);
  const out = {};
  for (const k of Object.keys(v)) setProp(out, k, clone(v[k]));
  return out;
}

/** The name of a JSON type, as the gateway words it in errors. */
function typeName(v) {
  if (v === null) return 'null';
  if (typeof v === 'boolean') return 'a boolean';
  if (isNumber(v)) return 'a number';
  if (typeof v === 'string') return 'a string';
  if (Array.isArray(v)) return 'an array';
  return 'an object';
}

// ---------------------------------------------------------------------------------------------
// Patch ops (docs/wire.md)
// ---------------------------------------------------------------------------------------------

/** The nine patch ops. */
export const OPS = Object.freeze([
  'set', 'delete', 'append', 'merge_object', 'increment', 'decrement', 'insert', 'remove',
  'lattice_merge',
]);

/** A delta (or thread) the gateway would refuse, worded as its 400 answer. */
export class ValidationError extends Error {
  /**
   * @param {'invalid_field'|'unknown_op'|'invalid_patch'} code the problem `code`
   * @param {string} field the problem `field`, e.g. `patches[0].patch.ops[1]`
   * @param {string} message
   */
  constructor(code, field, message) {
    super(`${field}: ${message}`);
    this.name = 'ValidationError';
    this.code = code;
    this.field = field;
  }
}

/** Why one op failed (the gateway's PatchError). */
class PatchError extends Error {}

/** Rust's `{:?}` of a string, for error messages. */
function debugStr(s) {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (c === 0) out += '\\0';
    else if (c < 0x20 || (c >= 0x7f && c <= 0x9f)) out += `\\u{${c.toString(16)}}`;
    else out += ch;
  }
  return `${out}"`;
}

/** Rust's `{}` of an f64 (plain decimal digits, never an exponent). */
function rustF64(x) {
  if (Number.isNaN(x)) return 'NaN';
  if (!Number.isFinite(x)) return x > 0 ? 'inf' : '-inf';
  if (Object.is(x, -0)) return '-0';
  let s = String(x);
  if (!s.includes('e')) return s;
  const neg = s.startsWith('-');
  if (neg) s = s.slice(1);
  const [mant, e] = s.split('e');
  const [ip, fp = ''] = mant.split('.');
  const digits = ip + fp;
  const point = ip.length + Number(e);
  let r;
  if (point <= 0) r = `0.${'0'.repeat(-point)}${digits}`;
  else if (point >= digits.length) r = digits + '0'.repeat(point - digits.length);
  else r = `${digits.slice(0, point)}.${digits.slice(point)}`;
  return (neg ? '-' : '') + r;
}

/** `/a/0/b` (`/` for the root), as the gateway renders a path in errors. */
function pathText(path) {
  return path.length === 0 ? '/' : path.map((s) => `/${s}`).join('');
}

/** Walks a path for a creating op; returns `[holder, key]` of the slot it names. */
function walkCreate(box, path) {
  let holder = box;
  let key = 'v';
  for (const seg of path) {
    let cur = holder[key];
    if (typeof seg === 'string') {
      if (!isObject(cur)) {
        cur = {};
        setProp(holder, key, cur);
      }
      if (!own(cur, seg)) setProp(cur, seg, null);
      holder = cur;
      key = seg;
    } else {
      [holder, key] = indexInto(cur, seg);
    }
  }
  return [holder, key];
}

/** Walks a path whose every segment must exist; returns `[holder, key]`. */
function walkExisting(box, path) {
  let holder = box;
  let key = 'v';
  for (const seg of path) {
    const cur = holder[key];
    if (typeof seg === 'string') {
      if (!isObject(cur)) {
        throw new PatchError(`key ${debugStr(seg)} used on ${typeName(cur)}, which is not an object`);
      }
      if (!own(cur, seg)) throw new PatchError('path not found');
      holder = cur;
      key = seg;
    } else {
      [holder, key] = indexInto(cur, seg);
    }
  }
  return [holder, key];
}

function indexInto(cur, index) {
  if (!Array.isArray(cur)) {
    throw new PatchError(`index ${index} used on ${typeName(cur)}, which is not an array`);
  }
  if (BigInt(index) >= BigInt(cur.length)) {
    throw new PatchError(`index ${index} is out of bounds for an array of length ${cur.length}`);
  }
  return [cur, Number(index)];
}

function deleteAt(box, path) {
  if (path.length === 0) {
    box.v = null;
    return;
  }
  let cur = box.v;
  for (const seg of path.slice(0, -1)) {
    if (typeof seg === 'string' && isObject(cur) && own(cur, seg)) cur = cur[seg];
    else if (typeof seg !== 'string' && Array.isArray(cur) && BigInt(seg) < BigInt(cur.length)) {
      cur = cur[Number(seg)];
    } else return;
  }
  const last = path[path.length - 1];
  if (typeof last === 'string') {
    if (isObject(cur)) delete cur[last];
  } else if (Array.isArray(cur) && BigInt(last) < BigInt(cur.length)) {
    cur.splice(Number(last), 1);
  }
}

function addTo(holder, key, amount, sign) {
  const cur = holder[key];
  if (!isNumber(cur)) throw new PatchError(`target is ${typeName(cur)}, not a number`);
  const asI64 = (v) => (isInt(v) && BigInt(v) >= I64_MIN && BigInt(v) <= I64_MAX ? BigInt(v) : null);
  const c = asI64(cur);
  const a = asI64(amount);
  if (c !== null && a !== null) {
    const r = sign === '+' ? c + a : c - a;
    if (r < I64_MIN || r > I64_MAX) {
      throw new PatchError(`integer overflow: ${c} ${sign} ${a} does not fit in i64`);
    }
    holder[key] = mkInt(r);
    return;
  }
  const cf = Number(cur);
  const af = Number(amount);
  const r = sign === '+' ? cf + af : cf - af;
  if (!Number.isFinite(r)) {
    throw new PatchError(`result of ${rustF64(cf)} ${sign} ${rustF64(af)} is not a finite number`);
  }
  holder[key] = mkFloat(r);
}

/** Applies one validated op to `box.v`; throws PatchError. */
function applyOp(box, op) {
  switch (op.op) {
    case 'set':
    case 'lattice_merge': {
      const [h, k] = walkCreate(box, op.path);
      setProp(h, k, clone(op.value));
      return;
    }
    case 'delete':
      deleteAt(box, op.path);
      return;
    case 'append': {
      const [h, k] = walkCreate(box, op.path);
      if (h[k] === null) setProp(h, k, []);
      if (!Array.isArray(h[k])) throw new PatchError(`target is ${typeName(h[k])}, not an array`);
      h[k].push(clone(op.value));
      return;
    }
    case 'merge_object': {
      if (!isObject(op.value)) throw new PatchError(`value is ${typeName(op.value)}, not an object`);
      const [h, k] = walkCreate(box, op.path);
      if (h[k] === null) setProp(h, k, {});
      if (!isObject(h[k])) throw new PatchError(`target is ${typeName(h[k])}, not an object`);
      for (const key of Object.keys(op.value)) setProp(h[k], key, clone(op.value[key]));
      return;
    }
    case 'increment':
    case 'decrement': {
      const [h, k] = walkExisting(box, op.path);
      addTo(h, k, op.amount, op.op === 'increment' ? '+' : '-');
      return;
    }
    case 'insert': {
      const [h, k] = walkExisting(box, op.path);
      const arr = h[k];
      if (!Array.isArray(arr)) throw new PatchError(`target is ${typeName(arr)}, not an array`);
      if (BigInt(op.index) > BigInt(arr.length)) {
        throw new PatchError(`index ${op.index} is out of bounds for an array of length ${arr.length}`);
      }
      arr.splice(Number(op.index), 0, clone(op.value));
      return;
    }
    case 'remove': {
      const [h, k] = walkExisting(box, op.path);
      const arr = h[k];
      if (!Array.isArray(arr)) throw new PatchError(`target is ${typeName(arr)}, not an array`);
      const at = arr.findIndex((e) => jsonEqual(e, op.value));
      if (at >= 0) arr.splice(at, 1);
      return;
    }
    default:
      throw new PatchError(`unknown op ${op.op}`);
  }
}

/**
 * `state` with the patches applied in order; the input is not changed. Throws a
 * ValidationError (`invalid_patch`, naming `patches[i].patch.ops[j]`) when an op fails.
 * @param {unknown} state
 * @param {Array<{patch: {ops: object[]}}>} patches validated TrackedPatches
 */
export function applyPatches(state, patches) {
  const box = { v: clone(state) };
  patches.forEach((tp, pi) => {
    tp.patch.ops.forEach((op, oi) => {
      try {
        applyOp(box, op);
      } catch (e) {
        if (!(e instanceof PatchError)) throw e;
        const field = `patches[${pi}].patch.ops[${oi}]`;
        throw new ValidationError('invalid_patch', field, `${op.op} at ${pathText(op.path)}: ${e.message}`);
      }
    });
  });
  return box.v;
}

// ---------------------------------------------------------------------------------------------
// Validating the wire shapes (what the gateway's reader accepts) and normalizing numbers
// ---------------------------------------------------------------------------------------------

const REASONS = ['UserMessage', 'AssistantTurnCommitted', 'ToolResultsCommitted', 'RunFinished'];
const ROLES = ['system', 'user', 'assistant', 'tool'];
const ORIGINS = ['user', 'subagent', 'ag_ui', 'ai_sdk', 'a2a', 'internal'];
const STATUSES = ['running', 'waiting', 'done'];
const SCOPES = ['thread', 'run', 'tool_call'];

const bad = (field, message) => new ValidationError('invalid_field', field, message);

/** `u64` fields: a non-negative integer up to u64::MAX. */
function isU64(v) {
  return isInt(v) && BigInt(v) >= 0n && BigInt(v) <= U64_MAX;
}

/**
 * A u64 above i64::MAX becomes the nearest float, recursively: the gateway stores integers
 * only when they fit i64 (docs/wire.md).
 */
function normalize(v) {
  if (typeof v === 'bigint') return v > I64_MAX ? mkFloat(Number(v)) : v;
  if (v === null || typeof v !== 'object' || v instanceof JsonFloat) return v;
  if (Array.isArray(v)) return v.map(normalize);
  const out = {};
  for (const k of Object.keys(v)) setProp(out, k, normalize(v[k]));
  return out;
}

/** Checks a struct field; `kind` is `string`, `u64`, `bool`, an enum array, or a function. */
function field(obj, name, at, kind, required) {
  if (!own(obj, name) || (obj[name] === null && !required)) {
    if (required) throw bad(at, `missing field \`${name}\``);
    return undefined;
  }
  const v = obj[name];
  const here = `${at === 'body' ? '' : `${at}.`}${name}`;
  if (kind === 'string') {
    if (typeof v !== 'string') throw bad(here, `invalid type: ${typeName(v)}, expected a string`);
  } else if (kind === 'u64') {
    if (!isU64(v)) throw bad(here, `invalid value: ${stringify(v)}, expected u64`);
  } else if (Array.isArray(kind)) {
    if (typeof v !== 'string' || !kind.includes(v)) {
      throw bad(here, `unknown variant ${stringify(v)}, expected one of ${kind.join(', ')}`);
    }
  } else if (typeof kind === 'function') {
    return kind(v, here);
  }
  return v;
}

function arrayOf(v, at, item) {
  if (!Array.isArray(v)) throw bad(at, `invalid type: ${typeName(v)}, expected a sequence`);
  return v.map((x, i) => item(x, `${at}[${i}]`));
}

function objectAt(v, at, what) {
  if (!isObject(v)) throw bad(at, `invalid type: ${typeName(v)}, expected ${what}`);
  return v;
}

/** The keys of `obj` a struct does not name, with normalized values (kept as sent). */
function extra(obj, known) {
  const out = {};
  for (const k of Object.keys(obj)) if (!known.includes(k)) setProp(out, k, normalize(obj[k]));
  return out;
}

function path(v, at) {
  if (!Array.isArray(v)) throw bad(at, `invalid type: ${typeName(v)}, expected a sequence`);
  return v.map((seg) => {
    if (typeof seg === 'string' || isU64(seg)) return seg;
    throw bad(at, `path segment ${stringify(seg)} is not a string key or a non-negative integer index`);
  });
}

/** One op, validated and with only the fields the gateway keeps. */
function op(v, at) {
  objectAt(v, at, 'internally tagged enum Op');
  if (!own(v, 'op')) throw bad(at, 'missing field `op`');
  if (typeof v.op !== 'string' || !OPS.includes(v.op)) {
    throw new ValidationError('unknown_op', `${at}.op`, `unknown patch op ${debugStr(String(v.op))}`);
  }
  const need = (name) => {
    if (!own(v, name)) throw bad(at, `missing field \`${name}\``);
    return v[name];
  };
  const out = { op: v.op, path: path(need('path'), at) };
  switch (v.op) {
    case 'delete':
      break;
    case 'increment':
    case 'decrement': {
      const amount = need('amount');
      if (!isNumber(amount)) throw bad(at, `invalid type: ${typeName(amount)}, expected a JSON number`);
      out.amount = normalize(amount);
      break;
    }
    case 'insert': {
      const index = need('index');
      if (!isU64(index)) throw bad(at, `invalid value: ${stringify(index)}, expected usize`);
      out.index = index;
      out.value = normalize(need('value'));
      break;
    }
    default:
      out.value = normalize(need('value'));
  }
  return out;
}

function trackedPatch(v, at) {
  objectAt(v, at, 'struct TrackedPatch');
  const p = field(v, 'patch', at, (x, here) => {
    objectAt(x, here, 'struct Patch');
    if (!own(x, 'ops')) throw bad(here, 'missing field `ops`');
    return { ops: arrayOf(x.ops, `${here}.ops`, op) };
  }, true);
  const out = { patch: p };
  for (const [name, kind] of [['id', 'string'], ['timestamp', 'u64'], ['source', 'string'], ['description', 'string']]) {
    const x = field(v, name, at, kind, false);
    if (x !== undefined) out[name] = x;
  }
  return out;
}

function message(v, at) {
  objectAt(v, at, 'struct Message');
  const out = {};
  const id = field(v, 'id', at, 'string', false);
  if (id !== undefined) out.id = id;
  out.role = field(v, 'role', at, ROLES, true);
  out.content = field(v, 'content', at, 'string', true);
  const calls = field(v, 'tool_calls', at, (x, here) => arrayOf(x, here, (c, cat) => {
    objectAt(c, cat, 'struct ToolCall');
    const call = { id: field(c, 'id', cat, 'string', true), name: field(c, 'name', cat, 'string', true) };
    if (!own(c, 'arguments')) throw bad(cat, 'missing field `arguments`');
    call.arguments = normalize(c.arguments);
    return call;
  }), false);
  if (calls !== undefined) out.tool_calls = calls;
  const tcid = field(v, 'tool_call_id', at, 'string', false);
  if (tcid !== undefined) out.tool_call_id = tcid;
  if (own(v, 'visibility')) {
    const vis = field(v, 'visibility', at, ['all', 'internal'], true);
    if (vis === 'internal') out.visibility = 'internal';
  }
  const meta = field(v, 'metadata', at, (m, here) => {
    objectAt(m, here, 'struct MessageMetadata');
    const mo = {};
    const run = field(m, 'run_id', here, 'string', false);
    if (run !== undefined) mo.run_id = run;
    const step = field(m, 'step_index', here, 'u64', false);
    if (step !== undefined) mo.step_index = step;
    return Object.assign(mo, extra(m, ['run_id', 'step_index']));
  }, false);
  if (meta !== undefined) out.metadata = meta;
  return Object.assign(out, extra(v, ['id', 'role', 'content', 'tool_calls', 'tool_call_id', 'visibility', 'metadata']));
}

function runMeta(v, at) {
  objectAt(v, at, 'struct RunMeta');
  const out = {
    agent_id: field(v, 'agent_id', at, 'string', true),
    origin: field(v, 'origin', at, ORIGINS, true),
    status: field(v, 'status', at, STATUSES, true),
  };
  for (const name of ['parent_thread_id', 'termination_code', 'termination_detail', 'source_mailbox_entry_id']) {
    const x = field(v, name, at, 'string', false);
    if (x !== undefined) out[name] = x;
  }
  out.input_tokens = field(v, 'input_tokens', at, 'u64', false) ?? 0;
  out.output_tokens = field(v, 'output_tokens', at, 'u64', false) ?? 0;
  return Object.assign(out, extra(v, [
    'agent_id', 'origin', 'status', 'parent_thread_id', 'termination_code', 'termination_detail',
    'source_mailbox_entry_id', 'input_tokens', 'output_tokens',
  ]));
}

function stateAction(v, at) {
  objectAt(v, at, 'struct StateAction');
  const out = {
    state_type_name: field(v, 'state_type_name', at, 'string', true),
    base_path: field(v, 'base_path', at, 'string', true),
    scope: field(v, 'scope', at, SCOPES, true),
    call_id_override: field(v, 'call_id_override', at, 'string', false) ?? null,
  };
  if (!own(v, 'payload')) throw bad(at, 'missing field `payload`');
  out.payload = normalize(v.payload);
  return Object.assign(out, extra(v, ['state_type_name', 'base_path', 'scope', 'call_id_override', 'payload']));
}

/**
 * A ChangeSet (delta) checked like the gateway's reader and normalized like its writer:
 * throws a ValidationError (`invalid_field` / `unknown_op`) for what the gateway answers 400.
 * @param {unknown} v @returns {ChangeSet}
 */
export function validateChangeSet(v) {
  const at = 'body';
  objectAt(v, at, 'struct ChangeSet');
  const out = { run_id: field(v, 'run_id', at, 'string', true) };
  const parent = field(v, 'parent_run_id', at, 'string', false);
  if (parent !== undefined) out.parent_run_id = parent;
  const meta = field(v, 'run_meta', at, runMeta, false);
  if (meta !== undefined) out.run_meta = meta;
  out.reason = field(v, 'reason', at, REASONS, true);
  out.messages = own(v, 'messages') ? arrayOf(v.messages, 'messages', message) : [];
  out.patches = own(v, 'patches') ? arrayOf(v.patches, 'patches', trackedPatch) : [];
  const actions = field(v, 'actions', at, (x, here) => arrayOf(x, here, stateAction), false);
  if (actions !== undefined) out.actions = actions;
  if (own(v, 'snapshot') && v.snapshot !== null) out.snapshot = normalize(v.snapshot);
  return Object.assign(out, extra(v, [
    'run_id', 'parent_run_id', 'run_meta', 'reason', 'messages', 'patches', 'actions', 'snapshot',
  ]));
}

/**
 * A full thread (a snapshot) checked and normalized; its current state is rebuilt from its
 * base state and patches. Throws a ValidationError.
 */
function validateThread(v) {
  objectAt(v, 'body', 'struct Thread');
  const t = {
    id: field(v, 'id', 'body', 'string', true),
    messages: own(v, 'messages') ? arrayOf(v.messages, 'messages', message) : [],
    state: own(v, 'state') ? normalize(v.state) : null,
    patches: own(v, 'patches') ? arrayOf(v.patches, 'patches', trackedPatch) : [],
    metadata: own(v, 'metadata') && isObject(v.metadata) ? normalize(v.metadata) : {},
  };
  for (const name of ['resource_id', 'parent_thread_id']) {
    const x = field(v, name, 'body', 'string', false);
    if (x !== undefined) t[name] = x;
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// A thread's local copy
// ---------------------------------------------------------------------------------------------

/**
 * @typedef {object} Message
 * @property {string} [id]
 * @property {'system'|'user'|'assistant'|'tool'} role
 * @property {string} content
 * @property {Array<{id: string, name: string, arguments: any}>} [tool_calls]
 * @property {string} [tool_call_id]
 * @property {'internal'} [visibility] absent means visible to all
 * @property {{run_id?: string, step_index?: number|bigint}} [metadata]
 *
 * @typedef {object} ChangeSet a tirea ThreadChangeSet
 * @property {string} run_id
 * @property {string} [parent_run_id]
 * @property {RunMeta} [run_meta]
 * @property {'UserMessage'|'AssistantTurnCommitted'|'ToolResultsCommitted'|'RunFinished'} reason
 * @property {Message[]} messages
 * @property {Array<{patch: {ops: object[]}}>} patches
 * @property {any} [snapshot]
 *
 * @typedef {object} RunMeta
 * @property {string} agent_id
 * @property {string} origin
 * @property {'running'|'waiting'|'done'} status
 * @property {number|bigint} input_tokens
 * @property {number|bigint} output_tokens
 *
 * @typedef {object} RunRecord
 * @property {string} run_id
 * @property {string} [parent_run_id]
 * @property {RunMeta} meta
 * @property {number} version the thread version of the last delta that updated it
 * @property {number} [created_at] unix ms (absent for a run first seen in a live event)
 * @property {number} [updated_at]
 *
 * @typedef {object} ThreadView the materialized thread handed to the UI (do not mutate)
 * @property {string} id
 * @property {string} [resource_id]
 * @property {string} [parent_thread_id]
 * @property {number} version the version this view reflects
 * @property {Message[]} messages every message, internal ones included
 * @property {any} state the current state: the base state with every patch applied
 * @property {any} base_state the stored base state
 * @property {Array<object>} patches the stored patches
 * @property {Record<string, any>} metadata
 * @property {RunRecord[]} runs
 */

/**
 * A thread's local copy, changed only by the gateway's rules. `follow()` keeps one; use it
 * directly to apply deltas you already have.
 */
export class ThreadMirror {
  /**
   * @param {object} thread a thread as the gateway returns it (parsed with `parse`)
   * @param {number} version the version it reflects
   */
  constructor(thread, version) {
    this.replace(thread, version, true);
    /** @type {Map<string, RunRecord>} */
    this.runs = new Map();
  }

  /** Replaces everything with a full thread (a `snapshot` event, or a reload). */
  replace(thread, version, keepServerKeys = false) {
    const t = validateThread(thread);
    const seen = new Set();
    t.messages.forEach((m, i) => {
      if (m.id === undefined) return;
      if (seen.has(m.id)) throw new ValidationError('invalid_patch', `messages[${i}].id`, `duplicate message id ${debugStr(m.id)}`);
      seen.add(m.id);
    });
    const current = applyPatches(t.state, t.patches);
    const metadata = t.metadata;
    if (!keepServerKeys && this.metadata) {
      // A full save's snapshot carries only the custom keys: keep the server's.
      for (const k of ['created_at', 'updated_at', 'version', 'version_timestamp']) {
        if (own(this.metadata, k) && !own(metadata, k)) metadata[k] = this.metadata[k];
      }
    }
    if (own(metadata, 'version')) metadata.version = version;
    Object.assign(this, {
      id: t.id, resource_id: t.resource_id, parent_thread_id: t.parent_thread_id,
      messages: t.messages, base: t.state, patches: t.patches, metadata, current, version, ids: seen,
    });
  }

  /** Sets the run records (from `GET .../runs`); later deltas update them by version. */
  setRuns(records) {
    this.runs = new Map(records.map((r) => [r.run_id, r]));
  }

  /**
   * Applies a delta as `version` (default: the next one), exactly as the gateway does; on a
   * ValidationError nothing changes. Returns the number of messages added.
   * @param {unknown} raw a ChangeSet
   * @param {number} [version]
   */
  applyDelta(raw, version = this.version + 1) {
    const delta = validateChangeSet(raw);
    const replaces = own(delta, 'snapshot');
    const fresh = [];
    const inDelta = new Set();
    for (const m of delta.messages) {
      if (m.id === undefined) fresh.push(m);
      else if (!this.ids.has(m.id) && !inDelta.has(m.id)) {
        inDelta.add(m.id);
        fresh.push(m);
      }
    }
    const base = replaces ? delta.snapshot : this.current;
    // Patches apply to a copy (all or nothing); without patches the state is unchanged.
    const current = delta.patches.length ? applyPatches(base, delta.patches) : base;
    // Validated; now commit.
    if (replaces) {
      this.base = delta.snapshot;
      this.patches = [];
    }
    for (const m of fresh) {
      if (m.id !== undefined) this.ids.add(m.id);
      this.messages.push(m);
    }
    this.patches.push(...delta.patches);
    this.current = current;
    if (delta.run_meta) {
      const run = this.runs.get(delta.run_id);
      if (!run) {
        const r = { run_id: delta.run_id, thread_id: this.id, meta: delta.run_meta, version };
        if (delta.parent_run_id !== undefined) r.parent_run_id = delta.parent_run_id;
        this.runs.set(delta.run_id, r);
      } else if (version > run.version) {
        run.meta = delta.run_meta;
        if (delta.parent_run_id !== undefined) run.parent_run_id = delta.parent_run_id;
        run.version = version;
      }
    }
    this.setVersion(version);
    return fresh.length;
  }

  /** Applies a metadata merge patch (`null` removes a key) as `version`. */
  applyMetadata(patch, version = this.version + 1) {
    for (const k of Object.keys(patch)) {
      if (['created_at', 'updated_at', 'version', 'version_timestamp'].includes(k)) continue;
      if (patch[k] === null) delete this.metadata[k];
      else setProp(this.metadata, k, normalize(patch[k]));
    }
    this.setVersion(version);
  }

  setVersion(version) {
    this.version = version;
    if (own(this.metadata, 'version')) this.metadata.version = version;
  }

  /** The materialized thread. @returns {ThreadView} */
  view() {
    const v = {
      id: this.id,
      version: this.version,
      messages: this.messages,
      state: this.current,
      base_state: this.base,
      patches: this.patches,
      metadata: this.metadata,
      runs: [...this.runs.values()],
    };
    if (this.resource_id !== undefined) v.resource_id = this.resource_id;
    if (this.parent_thread_id !== undefined) v.parent_thread_id = this.parent_thread_id;
    return v;
  }
}

// ---------------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------------

/** How long a REST call may take before it is aborted. */
const REQUEST_TIMEOUT_MS = 30_000;
/** Attempts of an append that meets a network error or a 503 (same Idempotency-Key each). */
const APPEND_ATTEMPTS = 4;

/** An error answer of the gateway (RFC 9457 problem), or a failed request (`status` 0). */
export class ApiError extends Error {
  /**
   * @param {number} status HTTP status, 0 when the request did not get an answer
   * @param {{code?: string, field?: string, detail?: string, current_version?: number}} problem
   */
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.name = 'ApiError';
    this.status = status;
    /** The stable machine code (`not_found`, `version_mismatch`, ...), or `network`. */
    this.code = problem.code || (status === 0 ? 'network' : `http_${status}`);
    this.field = problem.field;
    this.problem = problem;
  }
}

/** `/v1/threads/<id>` with the id percent-encoded. */
function threadPath(id) {
  return `/v1/threads/${encodeURIComponent(id)}`;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== undefined && v !== null) q.set(k, String(v));
  const s = q.toString();
  return s ? `?${s}` : '';
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const t = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => {
    clearTimeout(t);
    resolve();
  }, { once: true });
});

/**
 * REST calls against one gateway. Every answer is parsed losslessly (see `parse`).
 *
 *   const c = new Client({ baseUrl: 'https://gw.example', token });
 *   const { threads, next_cursor } = await c.listThreads({ resource_id: 'u1',
 *     order_by: 'updated_at', order: 'desc' });
 */
export class Client {
  /**
   * @param {object} [opts]
   * @param {string} [opts.baseUrl] the gateway's origin (default: this page's)
   * @param {string|(() => string|Promise<string>)} [opts.token] bearer token
   * @param {typeof fetch} [opts.fetch]
   * @param {number} [opts.timeoutMs] per request (default 30 s)
   */
  constructor(opts = {}) {
    this.baseUrl = (opts.baseUrl || '').replace(/\/+$/, '');
    this.token = opts.token;
    this.fetch = opts.fetch || globalThis.fetch.bind(globalThis);
    this.timeoutMs = opts.timeoutMs || REQUEST_TIMEOUT_MS;
  }

  /** The current token, or undefined. */
  async currentToken() {
    const t = typeof this.token === 'function' ? await this.token() : this.token;
    return t || undefined;
  }

  /**
   * One request; resolves `{status, headers, body}` for 2xx/304, throws ApiError otherwise.
   * @param {string} method @param {string} path @param {object} [opts]
   */
  async request(method, path, { body, headers = {}, signal } = {}) {
    const h = { accept: 'application/json', ...headers };
    const token = await this.currentToken();
    if (token) h.authorization = `Bearer ${token}`;
    if (body !== undefined) h['content-type'] = 'application/json';
    const timeout = AbortSignal.timeout(this.timeoutMs);
    const sig = signal && AbortSignal.any ? AbortSignal.any([signal, timeout]) : signal || timeout;
    let res;
    try {
      res = await this.fetch(this.baseUrl + path, {
        method, headers: h, body: body === undefined ? undefined : stringify(body), signal: sig,
      });
    } catch (e) {
      if (signal?.aborted) throw e;
      throw new ApiError(0, { code: 'network', detail: `${method} ${path}: ${e.message || e}` });
    }
    const text = res.status === 204 || res.status === 304 ? '' : await res.text();
    let parsed = null;
    if (text) {
      try {
        parsed = parse(text);
      } catch {
        parsed = { detail: text.slice(0, 200) };
      }
    }
    if (!res.ok && res.status !== 304) throw new ApiError(res.status, parsed || {});
    return { status: res.status, headers: res.headers, body: parsed };
  }

  /**
   * `POST /v1/threads`. @param {{id?: string, resource_id?: string, parent_thread_id?: string,
   * metadata?: object, state?: any, messages?: Message[]}} [thread]
   * @returns {Promise<object>} the created thread with its `version`
   */
  async createThread(thread = {}) {
    return (await this.request('POST', '/v1/threads', { body: thread })).body;
  }

  /**
   * `GET /v1/threads`.
   * @param {{resource_id?: string, parent_thread_id?: string, order_by?: 'id'|'created_at'|'updated_at',
   *   order?: 'asc'|'desc', limit?: number, cursor?: string}} [params]
   * @returns {Promise<{threads: object[], has_more: boolean, next_cursor?: string}>}
   */
  async listThreads(params = {}) {
    return (await this.request('GET', `/v1/threads${query(params)}`)).body;
  }

  /**
   * `GET /v1/threads/{id}`; `view: 'live'` includes what is still buffered.
   * @returns {Promise<object>} the thread with its `version`
   */
  async getThread(id, { view = 'live', signal } = {}) {
    return (await this.request('GET', `${threadPath(id)}${query({ view })}`, { signal })).body;
  }

  /**
   * `POST /v1/threads/{id}/deltas`. The append is retried on a network error or a 503 with
   * the same `Idempotency-Key` (one is generated when none is given), so a retry never
   * appends twice.
   * @param {string} id @param {ChangeSet} delta
   * @param {{ifMatch?: number, idempotencyKey?: string}} [opts]
   * @returns {Promise<{version: number, flushed?: boolean, replayed: boolean}>}
   */
  async append(id, delta, { ifMatch, idempotencyKey } = {}) {
    const key = idempotencyKey || randomKey();
    const headers = { 'idempotency-key': key };
    if (ifMatch !== undefined) headers['if-match'] = `"${ifMatch}"`;
    for (let attempt = 1; ; attempt++) {
      try {
        const res = await this.request('POST', `${threadPath(id)}/deltas`, { body: delta, headers });
        return { ...res.body, replayed: res.headers.get('idempotent-replayed') === 'true' };
      } catch (e) {
        const retryable = e instanceof ApiError && (e.status === 0 || e.status === 503);
        if (!retryable || attempt >= APPEND_ATTEMPTS) throw e;
        await sleep(200 * 2 ** attempt);
      }
    }
  }

  /**
   * `GET /v1/threads/{id}/messages`: one page.
   * @param {{after?: number, before?: number, limit?: number, order?: 'asc'|'desc',
   *   visibility?: 'all'|'internal'|'any', run_id?: string, view?: 'store'|'live'}} [params]
   * @returns {Promise<{messages: Array<Message & {cursor: number}>, has_more: boolean,
   *   next_cursor?: number, prev_cursor?: number, version: number}>}
   */
  async messages(id, params = {}) {
    return (await this.request('GET', `${threadPath(id)}/messages${query(params)}`)).body;
  }

  /** Every message, page by page (ascending), with `params` as for `messages`. */
  async *allMessages(id, params = {}) {
    let after;
    for (;;) {
      const page = await this.messages(id, { ...params, order: 'asc', limit: 200, after });
      yield* page.messages;
      if (!page.has_more) return;
      after = page.next_cursor;
    }
  }

  /** `GET /v1/threads/{id}/state`. @returns {Promise<{state: any, version: number}>} */
  async state(id, { view } = {}) {
    return (await this.request('GET', `${threadPath(id)}/state${query({ view })}`)).body;
  }

  /** `GET /v1/threads/{id}/runs`. @returns {Promise<RunRecord[]>} */
  async runs(id, { view, signal } = {}) {
    return (await this.request('GET', `${threadPath(id)}/runs${query({ view })}`, { signal })).body;
  }

  /** `PATCH /v1/threads/{id}`: merge custom metadata (`null` removes a key). */
  async patchMetadata(id, patch, { ifMatch } = {}) {
    const headers = ifMatch === undefined ? {} : { 'if-match': `"${ifMatch}"` };
    return (await this.request('PATCH', threadPath(id), { body: patch, headers })).body;
  }

  /** `POST /v1/threads/{id}/flush`. @returns {Promise<{version: number, applied: number}>} */
  async flush(id) {
    return (await this.request('POST', `${threadPath(id)}/flush`)).body;
  }

  /** `DELETE /v1/threads/{id}`. */
  async deleteThread(id, { ifMatch } = {}) {
    const headers = ifMatch === undefined ? {} : { 'if-match': `"${ifMatch}"` };
    await this.request('DELETE', threadPath(id), { headers });
  }
}

function randomKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events over fetch
// ---------------------------------------------------------------------------------------------

/**
 * Reads an SSE body (WHATWG rules: `\n`, `\r\n` or `\r` line ends, `:` comments, one optional
 * space after the colon, multi-line `data`) and calls `onEvent({type, data, id})` and
 * `onComment(text)`.
 */
async function readSse(body, onEvent, onComment) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let first = true;
  let data = [];
  let type = '';
  let id = null;
  const line = (l) => {
    if (l === '') {
      if (data.length) onEvent({ type: type || 'message', data: data.join('\n'), id });
      data = [];
      type = '';
      id = null;
      return;
    }
    if (l[0] === ':') {
      onComment(l.slice(1).trimStart());
      return;
    }
    const c = l.indexOf(':');
    const name = c < 0 ? l : l.slice(0, c);
    let value = c < 0 ? '' : l.slice(c + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (name === 'data') data.push(value);
    else if (name === 'event') type = value;
    else if (name === 'id' && !value.includes('\0')) id = value;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    if (first && buf.length) {
      if (buf.charCodeAt(0) === 0xfeff) buf = buf.slice(1);
      first = false;
    }
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const ch = buf.charCodeAt(i);
      if (ch !== 10 && ch !== 13) continue;
      if (ch === 13 && i + 1 === buf.length) break; // a CR may be half of a CRLF: wait
      line(buf.slice(start, i));
      if (ch === 13 && buf.charCodeAt(i + 1) === 10) i++;
      start = i + 1;
    }
    buf = buf.slice(start);
  }
}

// ---------------------------------------------------------------------------------------------
// follow()
// ---------------------------------------------------------------------------------------------

/** Reconnect back-off: first delay, and the cap. */
const RETRY_MIN_MS = 250;
const RETRY_MAX_MS = 10_000;
/** A stream silent this long is treated as dead (the gateway sends a keep-alive every 15 s). */
const STALE_AFTER_MS = 45_000;

/**
 * @typedef {object} FollowStatus
 * @property {'connecting'|'live'|'reconnecting'|'reset'|'deleted'|'not_found'|'unauthorized'|'closed'} state
 * @property {number|null} version the version the local copy reflects
 * @property {'direct'|'buffered'|null} mode the gateway's write mode, when it says
 * @property {number|null} stored buffered mode: the version the snapshot store holds
 * @property {number} pending buffered mode: writes not yet folded into the store
 * @property {number} attempt consecutive failed connection attempts
 * @property {string} [error] why the last attempt failed
 *
 * @typedef {object} FollowEvent
 * @property {'delta'|'snapshot'|'metadata'|'flushed'|'reset'|'deleted'|'load'} type
 * @property {number|null} version
 * @property {any} data the event's parsed data (for `load`: the loaded thread)
 */

/**
 * Follows a thread live. Returns a handle with `close()`, `thread` (the latest
 * ThreadView), `status`, and `done` (a promise settled when following ends: deleted, not
 * found, unauthorized, or closed).
 *
 * @param {string} threadId
 * @param {object} [opts]
 * @param {string} [opts.baseUrl] the gateway's origin (default: this page's)
 * @param {string|(() => string|Promise<string>)} [opts.token]
 * @param {'query'|'header'} [opts.tokenTransport] how the event stream carries the token
 * @param {(thread: ThreadView) => void} [opts.onThread] after every change of the copy
 * @param {(event: FollowEvent) => void} [opts.onEvent] after every event is applied
 * @param {(status: FollowStatus) => void} [opts.onStatus] on every connection change
 * @param {{thread: object, version: number}} [opts.initial] a copy to resume from (skips
 *   the first load; a position older than the gateway keeps is answered with `reset`)
 * @param {number} [opts.staleAfterMs]
 * @param {typeof fetch} [opts.fetch]
 */
export function follow(threadId, opts = {}) {
  const client = opts.client || new Client(opts);
  const staleAfter = opts.staleAfterMs || STALE_AFTER_MS;
  const stop = new AbortController();
  /** @type {ThreadMirror|null} */
  let mirror = null;
  /** @type {FollowStatus} */
  const status = { state: 'connecting', version: null, mode: null, stored: null, pending: 0, attempt: 0 };
  let resolveDone;
  const done = new Promise((r) => {
    resolveDone = r;
  });
  const call = (fn, arg) => {
    try {
      fn?.(arg);
    } catch (e) {
      // A failing callback must not stop the stream; report it where it can be seen.
      setTimeout(() => {
        throw e;
      });
    }
  };
  const setStatus = (patch) => {
    Object.assign(status, patch);
    status.version = mirror ? mirror.version : null;
    status.pending = status.mode === 'buffered' && status.stored !== null && mirror
      ? Math.max(0, mirror.version - status.stored) : 0;
    call(opts.onStatus, { ...status });
  };
  const emit = (type, version, data) => {
    call(opts.onEvent, { type, version, data });
    if (mirror) call(opts.onThread, mirror.view());
  };
  const terminal = (state, error) => {
    setStatus({ state, error });
    stop.abort();
    resolveDone(state);
  };

  /** Loads the live snapshot and the runs; `null` when following must end. */
  /**
   * A copy of `thread` at `version` that remembers which life of the thread it is (the
   * `incarnation` the gateway gave the snapshot; see `stream`). A `snapshot` event keeps it.
   */
  function mirrorOf(thread, version) {
    const m = new ThreadMirror(thread, version);
    m.incarnation = typeof thread.incarnation === 'string' ? thread.incarnation : undefined;
    return m;
  }

  async function load() {
    const thread = await client.getThread(threadId, { view: 'live', signal: stop.signal });
    const m = mirrorOf(thread, Number(thread.version));
    try {
      m.setRuns(await client.runs(threadId, { view: 'live', signal: stop.signal }));
    } catch (e) {
      // Runs are shown, not needed to follow: a gateway without `view=live` on runs, or a
      // momentary failure, leaves them to the deltas.
      if (e instanceof ApiError && e.status === 400) {
        m.setRuns(await client.runs(threadId, { signal: stop.signal }));
      } else if (!(e instanceof ApiError) || e.status === 404) throw e;
    }
    mirror = m;
    emit('load', m.version, thread);
  }

  /** Opens the stream after the copy's version and reads it until it ends. */
  async function stream(resuming) {
    const params = { after: mirror.version };
    // The copy's life: if the thread is deleted and created again while this stream is away,
    // the gateway answers `reset` instead of continuing into the new thread's versions.
    if (mirror.incarnation) params.incarnation = mirror.incarnation;
    const headers = { accept: 'text/event-stream' };
    const token = await client.currentToken();
    if (token && opts.tokenTransport === 'header') headers.authorization = `Bearer ${token}`;
    else if (token) params.access_token = token;
    if (resuming) headers['last-event-id'] = String(mirror.version);
    const conn = new AbortController();
    const onStop = () => conn.abort();
    stop.signal.addEventListener('abort', onStop, { once: true });
    let lastByte = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - lastByte > staleAfter) conn.abort(new Error('stream silent too long'));
    }, Math.min(staleAfter, 5_000));
    let outcome = 'ended';
    try {
      let res;
      try {
        res = await client.fetch(`${client.baseUrl}${threadPath(threadId)}/events${query(params)}`, {
          headers, signal: conn.signal, cache: 'no-store',
        });
      } catch (e) {
        throw new ApiError(0, { code: 'network', detail: String(e.message || e) });
      }
      if (!res.ok) {
        let problem = {};
        try {
          problem = parse(await res.text());
        } catch { /* not a problem body */ }
        throw new ApiError(res.status, problem);
      }
      const mode = res.headers.get('threadgate-mode');
      const stored = res.headers.get('threadgate-stored-version');
      setStatus({
        state: 'live',
        attempt: 0,
        error: undefined,
        mode: mode || status.mode,
        stored: stored !== null ? Math.max(Number(stored), status.stored ?? 0) : status.stored,
      });
      await readSse(res.body, (ev) => {
        lastByte = Date.now();
        if (outcome !== 'ended') return;
        outcome = onSse(ev) || 'ended';
        if (outcome !== 'ended') conn.abort();
      }, (comment) => {
        lastByte = Date.now();
        const m = /^keep-alive (\d+)$/.exec(comment);
        // The keep-alive carries the version the stream has reached: ahead of the copy means
        // something was not delivered, so resume from the copy's version.
        if (m && mirror && Number(m[1]) > mirror.version && outcome === 'ended') {
          outcome = 'resync';
          conn.abort();
        }
      }).catch((e) => {
        if (outcome === 'ended' && !stop.signal.aborted) throw e;
      });
      return outcome;
    } finally {
      clearInterval(watchdog);
      stop.signal.removeEventListener('abort', onStop);
    }
  }

  /** Applies one event; returns a non-'ended' outcome when the stream must be left. */
  function onSse(ev) {
    let data;
    try {
      data = parse(ev.data);
    } catch {
      return 'reload';
    }
    const version = ev.id !== null ? Number(ev.id) : null;
    switch (ev.type) {
      case 'delta':
      case 'snapshot':
      case 'metadata': {
        if (version === null || version <= mirror.version) return undefined; // already applied
        if (version !== mirror.version + 1) return 'reload'; // a gap: never show a hole
        try {
          if (ev.type === 'delta') mirror.applyDelta(data.delta, version);
          else if (ev.type === 'metadata') mirror.applyMetadata(data.metadata, version);
          else {
            const runs = mirror.runs;
            mirror.replace(data.thread, version);
            mirror.runs = runs;
          }
        } catch {
          return 'reload'; // the copy disagrees with the gateway: take the gateway's
        }
        if (status.mode !== 'buffered') status.stored = mirror.version;
        setStatus({});
        emit(ev.type, version, data);
        return undefined;
      }
      case 'flushed':
        setStatus({ mode: 'buffered', stored: Math.max(Number(data.version), status.stored ?? 0) });
        call(opts.onEvent, { type: 'flushed', version: Number(data.version), data });
        return undefined;
      case 'reset':
        setStatus({ state: 'reset' });
        call(opts.onEvent, { type: 'reset', version: Number(data.version), data });
        return 'reload';
      case 'deleted':
        call(opts.onEvent, { type: 'deleted', version: null, data });
        return 'deleted';
      default:
        return undefined;
    }
  }

  async function run() {
    let needLoad = !opts.initial;
    if (opts.initial) {
      try {
        mirror = mirrorOf(opts.initial.thread, Number(opts.initial.version));
        emit('load', mirror.version, opts.initial.thread);
      } catch {
        needLoad = true;
      }
    }
    let resuming = false;
    let delay = RETRY_MIN_MS;
    while (!stop.signal.aborted) {
      try {
        if (needLoad) {
          await load();
          needLoad = false;
          resuming = false;
        }
        const outcome = await stream(resuming);
        if (stop.signal.aborted) break;
        if (outcome === 'deleted') return terminal('deleted');
        if (outcome === 'reload') {
          needLoad = true;
          continue;
        }
        // The server ended the stream (shutdown, or a resync): reconnect at once, once.
        resuming = true;
        setStatus({ state: 'reconnecting' });
        await sleep(status.attempt ? delay : 0, stop.signal);
        status.attempt += 1;
      } catch (e) {
        if (stop.signal.aborted) break;
        if (e instanceof ApiError && e.status === 404) return terminal(mirror ? 'deleted' : 'not_found', e.message);
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) return terminal('unauthorized', e.message);
        if (e instanceof ApiError && e.status >= 400 && e.status < 500 && e.status !== 408 && e.status !== 429) {
          // The copy's position was refused: start over from a fresh snapshot.
          needLoad = true;
        }
        resuming = mirror !== null;
        status.attempt += 1;
        setStatus({ state: 'reconnecting', error: String(e.message || e) });
        delay = Math.min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** Math.min(status.attempt - 1, 6));
        await sleep(delay * (0.75 + Math.random() / 2), stop.signal);
      }
    }
    if (status.state !== 'closed') setStatus({ state: 'closed' });
    resolveDone('closed');
    return undefined;
  }

  setStatus({ state: 'connecting' });
  run();
  return {
    /** Stops following; `done` resolves with `'closed'`. */
    close() {
      if (stop.signal.aborted) return;
      stop.abort();
      setStatus({ state: 'closed' });
      resolveDone('closed');
    },
    /** The latest materialized thread, or null before the first load. */
    get thread() {
      return mirror ? mirror.view() : null;
    },
    /** A copy of the latest status. */
    get status() {
      return { ...status };
    },
    done,
  };
}
