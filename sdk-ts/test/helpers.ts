/**
 * What the node tests share: the environment `run-tests.sh` sets (a private MVM_HOME with
 * its own mvmd, `MVM_MVMCTL`, the repo's Python, the run's seed), `test` (registers a
 * file's tests in the seed's order), bounded subprocesses, bounded polling.
 */
import { spawn, spawnSync, type SpawnSyncReturns } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { test as nodeTest, type TestContext } from "node:test";
import { fileURLToPath } from "node:url";
import { fnv1a, parseSeed, shuffle } from "./order.js";

export const SDK_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
export const ROOT = path.resolve(SDK_DIR, "..");
export const RUNNER = path.join(SDK_DIR, "dist", "src", "runner.js");
export const IMAGE = "python-3.11";

function need(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run the tests with sdk-ts/run-tests.sh`);
  return v;
}

export const HOME = need("MVM_HOME");
export const MVMCTL = need("MVM_MVMCTL");
export const PYTHON = need("MVM_TEST_PYTHON");
/** The value stored as the secret `api-key` (never printed by a test). */
export const SECRET_VALUE = need("MVM_TEST_SECRET");
/** The run's seed (order.ts): the order of the files and of each file's tests. */
export const SEED = parseSeed(process.env.MVM_TEST_SEED);

type TestFn = (t: TestContext) => void | Promise<void>;
const pending: [string, TestFn][] = [];

/**
 * node:test's `test(name, fn)`, in a seeded random order: a file's tests are collected
 * while it loads and registered together right after (setImmediate; so no top-level
 * `await` between tests), shuffled by SEED mixed with the file's test names. No test may
 * rely on another having run before it (a shared sandbox is a lazily made fixture).
 */
export function test(name: string, fn: TestFn): void {
  if (pending.some(([n]) => n === name)) throw new Error(`two tests named ${JSON.stringify(name)}`);
  if (pending.length === 0) setImmediate(registerPending);
  pending.push([name, fn]);
}

function registerPending(): void {
  const tests = pending.splice(0);
  const seed = (SEED ^ fnv1a(tests.map(([n]) => n).join("\n"))) >>> 0;
  for (const [name, fn] of shuffle(tests, seed)) nodeTest(name, fn);
}

export interface Ran {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function ran(r: SpawnSyncReturns<string>): Ran {
  if (r.error) throw r.error;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

/** `mvmctl ARGS` against the test home, bounded. */
export function mvmctl(args: string[], opts: { input?: string; timeout?: number; cwd?: string } = {}): Ran {
  return ran(
    spawnSync(MVMCTL, args, {
      input: opts.input ?? "",
      encoding: "utf8",
      timeout: (opts.timeout ?? 300) * 1000,
      cwd: opts.cwd,
      env: process.env,
    }),
  );
}

/** `node runner.js SCRIPT` (live mode unless `env` says otherwise), bounded. */
export function runScript(script: string, env: Record<string, string> = {}, timeout = 300): Ran {
  return ran(
    spawnSync(process.execPath, [RUNNER, script], {
      encoding: "utf8",
      timeout: timeout * 1000,
      cwd: path.dirname(script),
      env: { ...process.env, ...env },
    }),
  );
}

/** A long-running `node runner.js SCRIPT` (for killing). */
export function startScript(script: string) {
  return spawn(process.execPath, [RUNNER, script], {
    cwd: path.dirname(script),
    env: process.env,
    stdio: ["ignore", "pipe", "pipe"],
  });
}

/** Poll `pred` until true or `seconds` pass; the last answer. */
export async function waitUntil(pred: () => boolean | Promise<boolean>, seconds: number, every = 0.5): Promise<boolean> {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    if (await pred()) return true;
    await new Promise((r) => setTimeout(r, every * 1000));
  }
  return pred();
}

/** Names of the sandboxes mvmd knows (through the CLI, not the SDK under test). */
export function sandboxNames(): string[] {
  const r = mvmctl(["ls", "--json"], { timeout: 60 });
  if (r.code !== 0) throw new Error(`mvmctl ls failed: ${r.stderr}`);
  return (JSON.parse(r.stdout) as { name: string }[]).map((s) => s.name);
}

/** The ```ts blocks of docs/sdk-ts.md (the first is the cookbook's example), or of `file`. */
export function docBlocks(file = path.join("docs", "sdk-ts.md")): string[] {
  const text = fs.readFileSync(path.join(ROOT, file), "utf8");
  return [...text.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]!);
}
