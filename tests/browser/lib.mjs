// Shared helpers of the JavaScript tests (run by tests/it/viewer.rs).

import { copyFileSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * Imports static/threadgate.js as Node sees an ES module (Node 20 reads a `.js` file outside
 * a `"type": "module"` package as CommonJS, and static/ must stay a plain folder of assets).
 */
export async function loadModule() {
  const dir = mkdtempSync(join(tmpdir(), 'threadgate-js-'));
  const file = join(dir, 'threadgate.mjs');
  copyFileSync(join(ROOT, 'static', 'threadgate.js'), file);
  return import(file);
}

/** Command-line `--name value` pairs. */
export function args() {
  const out = {};
  const a = process.argv.slice(2);
  for (let i = 0; i < a.length; i += 2) out[a[i].replace(/^--/, '')] = a[i + 1];
  return out;
}

/** A small seeded PRNG (mulberry32): the same seed gives the same sequence. */
export function rng(seed) {
  let s = seed >>> 0;
  const next = () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (n) => Math.floor(next() * n),
    pick: (arr) => arr[Math.floor(next() * arr.length)],
    chance: (p) => next() < p,
  };
}

/** Polls `fn` until it returns a truthy value, or fails after `ms` (a hang guard). */
export async function until(what, fn, ms = 30_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}
