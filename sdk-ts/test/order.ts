/**
 * The tests' seeded random order (node 20's `node --test` has no shuffle): one seed per
 * run, `MVM_TEST_SEED` (run-tests.sh prints it; set it to replay an order), shuffles the
 * test files (`node dist/test/order.js SEED FILE...` prints them in that order) and, in
 * each file, the order its tests are registered in (`test` from helpers.ts collects them).
 * Needs no mvmd, so run-tests.sh can call it before anything is set up.
 */
import * as path from "node:path";
import { fileURLToPath } from "node:url";

/** mulberry32: a small seeded PRNG, uniform in [0, 1). */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** FNV-1a of `s` (mixes a file's test names into the seed: files get different orders). */
export function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (const c of Buffer.from(s, "utf8")) h = Math.imul(h ^ c, 0x01000193) >>> 0;
  return h;
}

/** A copy of `items` in the order `seed` gives (Fisher-Yates). */
export function shuffle<T>(items: readonly T[], seed: number): T[] {
  const out = [...items];
  const rand = mulberry32(seed);
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/** A decimal seed as an unsigned 32-bit number (a larger one is taken modulo 2^32). */
export function parseSeed(text: string | undefined): number {
  const s = (text ?? "").trim();
  if (!/^\d+$/.test(s)) {
    throw new Error(`MVM_TEST_SEED must be a decimal number, not ${JSON.stringify(s)}: run the tests with sdk-ts/run-tests.sh`);
  }
  return Number(BigInt(s) % 4294967296n);
}

// `node dist/test/order.js SEED FILE...`: the files, one a line, in the seed's order
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const [seed, ...files] = process.argv.slice(2);
  for (const f of shuffle(files, parseSeed(seed))) console.log(f);
}
