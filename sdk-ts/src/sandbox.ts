/**
 * `Sandbox`: a named microVM sandbox, performed by mvmd (live) or recorded into the IR
 * (record mode), the same surface as the Python SDK's `mvm.Sandbox` with async methods.
 * `await using sandbox = await Sandbox.create(...)` stops it at the end of the scope,
 * exception or not; `kill()`/`stop()` do it by hand, `destroy()` also removes snapshots.
 */
import "./polyfill.js";
import type { Backend } from "./backend.js";
import { Commands } from "./commands.js";
import { type Duration, parseDuration } from "./durations.js";
import { InvalidArgument, MvmError, SandboxNotFound } from "./errors.js";
import { Files } from "./files.js";
import { collect, checkEntry, scriptDir } from "./include.js";
import type { LogEvent, SandboxInfo, SandboxSpec } from "./models.js";
import * as mode from "./mode.js";
import { type Env, LABEL_RE, Network, Resources, checkName, splitEnv } from "./options.js";
import { Ports } from "./ports.js";
import * as path from "node:path";
import * as fs from "node:fs";

export const DEFAULT_TTL = "30m";
export const MAX_TTL = 7 * 24 * 3600;
export const MAX_TAGS = 32; // as mvmd (`MAX_TAGS` in src/mvm/api/models.py)
export const MAX_TAG_VALUE = 256;

/** A saved sandbox state; pass it (or its `id`) to `resume({ snapshot })`. */
export interface Snapshot {
  id: string;
  name: string;
  sandbox: string;
  created: number;
  size: number;
  auditId: string | null;
}

export interface CreateOptions {
  name?: string | null;
  workloadId?: string | null;
  ttl?: Duration;
  /** Host paths relative to the script's directory, copied to `/work/<path>`. */
  include?: readonly string[];
  tags?: Record<string, string>;
  resources?: Resources;
  network?: Network;
  env?: Env;
}

export interface LogsOptions {
  follow?: boolean;
  /** Always true: secret values never leave mvmd. */
  redact?: boolean;
  /** UNIX time in seconds. */
  since?: number | null;
}

function checkTtl(ttl: Duration): number {
  const seconds = parseDuration(ttl, "ttl");
  if (seconds > MAX_TTL) throw new InvalidArgument(`ttl is at most ${MAX_TTL}s (7 days)`, { data: { max: MAX_TTL } });
  return seconds;
}

/** Validate everything `create` takes (InvalidArgument at the call) into a spec. */
export function buildSpec(image: string, opts: CreateOptions, base: string): SandboxSpec {
  checkName("image", image);
  const name = opts.name ?? null;
  if (name !== null) checkName("sandbox", name);
  const workloadId = opts.workloadId ?? null;
  if (workloadId !== null && (typeof workloadId !== "string" || !LABEL_RE.test(workloadId))) {
    throw new InvalidArgument(`invalid workloadId ${JSON.stringify(workloadId)}`);
  }
  const ttlSeconds = checkTtl(opts.ttl ?? DEFAULT_TTL);
  const tags = { ...(opts.tags ?? {}) };
  if (Object.keys(tags).length > MAX_TAGS) throw new InvalidArgument(`at most ${MAX_TAGS} tags`);
  for (const [k, v] of Object.entries(tags)) {
    if (!LABEL_RE.test(k)) throw new InvalidArgument(`invalid tag name ${JSON.stringify(k)}`);
    if (typeof v !== "string" || v.length > MAX_TAG_VALUE) {
      throw new InvalidArgument(`tag ${k} must be a string of at most ${MAX_TAG_VALUE} characters`);
    }
  }
  const res = opts.resources ?? new Resources();
  if (!(res instanceof Resources)) throw new InvalidArgument("resources takes resources({...})");
  const net = opts.network ?? new Network();
  if (!(net instanceof Network)) throw new InvalidArgument("network takes network({...})");
  const [env, secretEnv] = splitEnv(opts.env);
  const include = opts.include ?? [];
  const files = include.length ? collect(base, include) : [];
  const root = include.length ? fs.realpathSync(base) : null;
  const mounts = root === null ? [] : [...new Set(include.map((e) => path.join(root, checkEntry(e))))].sort();
  return {
    image,
    name,
    cpus: res.cpuCores,
    memoryMb: res.memoryMb,
    diskMb: res.rootfsSizeMb,
    ttlSeconds,
    network: net.spec(),
    env,
    secretEnv,
    tags,
    workloadId,
    includes: files,
    mounts,
    includeRoot: root,
  };
}

/** Disposals started by a sync `using` (live mode): the runner waits for them. */
const pendingStops = new Set<Promise<void>>();

export async function settleDisposals(): Promise<void> {
  while (pendingStops.size) await Promise.allSettled([...pendingStops]);
}

export class Sandbox {
  readonly name: string;
  readonly id: string;
  readonly image: string;
  readonly auditId: string | null;
  readonly files: Files;
  readonly commands: Commands;
  readonly ports: Ports;
  private _info: SandboxInfo;

  constructor(
    readonly backend: Backend,
    info: SandboxInfo,
  ) {
    this._info = info;
    this.name = info.name;
    this.id = info.id;
    this.image = info.image;
    this.auditId = info.auditId;
    const target = { backend, key: info.name };
    this.files = new Files(target);
    this.commands = new Commands(target);
    this.ports = new Ports(target);
  }

  /** The name mvmd (or the recording) knows the sandbox by. */
  get key(): string {
    return this.name;
  }

  /** True in record mode (results are placeholders). */
  get recording(): boolean {
    return this.backend.recording;
  }

  toString(): string {
    return `Sandbox(name=${this.name}, image=${this.image})`;
  }

  // -- making and finding --------------------------------------------------------------
  /**
   * Boot a sandbox of `image`; `include` paths (relative to the running script's
   * directory) are copied to `/work/<path>`. Unknown images throw ImageNotFound.
   */
  static async create(image = "python", opts: CreateOptions = {}): Promise<Sandbox> {
    const be = mode.backend();
    const spec = buildSpec(image, opts, scriptDir());
    return new Sandbox(be, await be.create(spec));
  }

  /** Attach to an existing sandbox (e.g. one made by `mvmctl up`). */
  static async connect(name: string): Promise<Sandbox> {
    checkName("sandbox", name);
    const be = mode.backend();
    return new Sandbox(be, await be.connect(name));
  }

  /** Every sandbox mvmd knows (name, image, state, ttlLeft, ...). */
  static list(): Promise<SandboxInfo[]> {
    return mode.backend().listSandboxes();
  }

  // -- state -------------------------------------------------------------------------
  async info(): Promise<SandboxInfo> {
    this._info = await this.backend.info(this.name);
    return this._info;
  }

  /** The current state ("running", "paused", ...), asked of mvmd. */
  async state(): Promise<string> {
    return (await this.info()).state;
  }

  async setTtl(ttl: Duration): Promise<void> {
    this._info = await this.backend.setTtl(this.name, checkTtl(ttl));
  }

  /** Freeze the VM (no CPU); `resume()` continues it. */
  async pause(): Promise<void> {
    this._info = await this.backend.pause(this.name);
  }

  /**
   * Continue a paused sandbox, or with `snapshot` put it back to that snapshot (recreating
   * it if it was stopped) and leave it running.
   */
  async resume(opts: { snapshot?: string | Snapshot | null } = {}): Promise<void> {
    const snap = opts.snapshot ?? null;
    if (snap === null) {
      this._info = await this.backend.resume(this.name);
      return;
    }
    const id = typeof snap === "string" ? snap : snap.id;
    checkName("snapshot", id);
    this._info = await this.backend.restore(this.name, id);
  }

  /**
   * Save memory, files and processes under `name` (kept after `stop`, removed by
   * `destroy`). Snapshots may hold secrets the guest saw: delete them explicitly.
   */
  async snapshot(opts: { name: string } | string): Promise<Snapshot> {
    const name = typeof opts === "string" ? opts : opts.name;
    checkName("snapshot", name);
    const s = await this.backend.snapshot(this.name, name);
    return { id: s.name, name: s.name, sandbox: s.sandbox, created: s.created, size: s.size, auditId: s.auditId };
  }

  /** Stop and remove the VM (its snapshots stay: `resume({ snapshot })` recreates it). */
  async stop(): Promise<void> {
    await this.backend.stop(this.name);
  }

  /** The same as `stop()` (the cookbook's name). */
  kill(): Promise<void> {
    return this.stop();
  }

  /** Stop the VM if it runs and delete its snapshots: nothing of it is left. */
  async destroy(): Promise<void> {
    await this.backend.destroy(this.name);
  }

  /**
   * The console's and background processes' output (`message`, `stream`, `timestamp`);
   * with `follow` it waits for more until the loop stops (break out of it).
   */
  logs(opts: LogsOptions = {}): AsyncIterable<LogEvent> {
    if (opts.redact !== undefined && opts.redact !== true) {
      throw new InvalidArgument("logs({ redact: false }) is not offered: secret values never leave mvmd", {
        hint: "call logs() or logs({ redact: true })",
      });
    }
    const since = opts.since ?? null;
    if (since !== null && (typeof since !== "number" || !Number.isFinite(since))) {
      throw new InvalidArgument(`since must be a UNIX time in seconds, not ${String(since)}`);
    }
    return this.backend.logs(this.name, opts.follow === true, since);
  }

  // -- cleanup -----------------------------------------------------------------------
  /** `await using`: stop at the end of the scope (already stopped is fine). */
  async [Symbol.asyncDispose](): Promise<void> {
    try {
      await this.stop();
    } catch (err) {
      if (!(err instanceof SandboxNotFound)) throw err;
    }
  }

  /**
   * `using` (sync): a recording records the stop at once; live mode starts it and the
   * process stays alive until mvmd has answered (the runner also waits for it). Prefer
   * `await using`, which can report a failed stop.
   */
  [Symbol.dispose](): void {
    const rec = mode.recorder();
    if (rec !== null && this.backend === rec) {
      rec.stopSync(this.name);
      return;
    }
    const p: Promise<void> = this[Symbol.asyncDispose]()
      .catch((err: unknown) => {
        const msg = err instanceof MvmError ? err.message : String(err);
        process.stderr.write(`mvm: stopping ${this.name} failed: ${msg}\n`);
        process.exitCode = process.exitCode || 1;
      })
      .finally(() => pendingStops.delete(p));
    pendingStops.add(p);
  }
}
