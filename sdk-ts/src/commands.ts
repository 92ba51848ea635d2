/**
 * `sandbox.commands`: run a command to its end (`run`) or start one in the background
 * (`start`, a `CommandHandle`). An argv array runs directly (no shell); a string runs
 * under `sh -c`. Every wait has a default bound. Mirrors `mvm/sdk/commands.py`.
 */
import type { Backend } from "./backend.js";
import { CommandResult } from "./backend.js";
import { type Duration, parseDuration } from "./durations.js";
import { CommandFailed, CommandTimeout, InvalidArgument } from "./errors.js";
import type { ProcView } from "./models.js";
import { type Env, splitEnv } from "./options.js";

export const DEFAULT_TIMEOUT = 300;
export const MAX_TIMEOUT = 24 * 3600;
/** Largest stdin given at start (more goes through `sendStdin`). */
export const MAX_STDIN = 1024 * 1024;
export const MAX_ARGS = 4096;
export const DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024;
/** Largest `sendStdin` in one call (mvmd's request bound). */
export const MAX_BODY = 64 * 1024 * 1024;
/** How long one poll of a running process waits (the stdout/stderr iterators). */
export const POLL_SECONDS = 0.5;

export type Argv = readonly string[] | string;
export type Data = string | Uint8Array;

/** The sandbox a sub-API works on: its backend and its name. */
export interface Target {
  readonly backend: Backend;
  readonly key: string;
}

export function checkArgv(argv: Argv): string[] {
  if (typeof argv === "string") return ["sh", "-c", argv];
  if (!Array.isArray(argv) || argv.length === 0 || argv.length > MAX_ARGS) {
    throw new InvalidArgument(`a command needs 1 to ${MAX_ARGS} arguments`);
  }
  for (const a of argv) {
    if (typeof a !== "string" || a.includes("\0")) {
      throw new InvalidArgument(`command arguments must be strings without NUL bytes, not ${JSON.stringify(a)}`);
    }
  }
  return [...argv];
}

export function checkTimeout(value: Duration, what = "timeoutSeconds"): number {
  const seconds = parseDuration(value, what);
  if (seconds > MAX_TIMEOUT) throw new InvalidArgument(`${what} is at most ${MAX_TIMEOUT}s`, { data: { max: MAX_TIMEOUT } });
  return seconds;
}

export function asBytes(data: Data, what = "data"): Buffer {
  if (typeof data === "string") return Buffer.from(data, "utf8");
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  throw new InvalidArgument(`${what} must be a string or bytes, not ${typeof data}`);
}

function checkStdin(data: Data | undefined): Buffer {
  const body = asBytes(data ?? "", "stdin");
  if (body.length > MAX_STDIN) throw new InvalidArgument(`stdin at start is at most ${MAX_STDIN} bytes; use sendStdin`);
  return body;
}

/** Throw CommandTimeout / CommandFailed (with `result`) where the caller must know. */
export function finish(result: CommandResult, argv: string[], timeout: number, check: boolean): CommandResult {
  if (result.timedOut) {
    const exc = new CommandTimeout(`${argv[0]} ran past its timeout of ${timeout}s and was killed`, {
      hint: "raise timeoutSeconds, or make the command faster",
      data: { argv, timeout_seconds: timeout },
    });
    exc.result = result;
    throw exc;
  }
  if (check && result.exitCode !== 0) {
    const fail = new CommandFailed(`${argv[0]} exited with status ${result.exitCode}`, {
      hint: "see .result.stderr, or pass check: false to get the result instead",
      data: { argv, exit_code: result.exitCode },
    });
    fail.result = result;
    throw fail;
  }
  return result;
}

export interface RunOptions {
  env?: Env;
  cwd?: string | null;
  user?: string | null;
  stdin?: Data;
  timeoutSeconds?: Duration;
  check?: boolean;
  outputLimit?: number;
}

export interface StartOptions {
  env?: Env;
  cwd?: string | null;
  user?: string | null;
  stdin?: Data;
  stdinOpen?: boolean;
}

export class Commands {
  constructor(private readonly sb: Target) {}

  /**
   * Run to the end: the result has exitCode, stdout, stderr, auditId, truncated.
   * CommandTimeout past `timeoutSeconds`; CommandFailed on non-zero only with `check`.
   */
  async run(argv: Argv, opts: RunOptions = {}): Promise<CommandResult> {
    const args = checkArgv(argv);
    const timeout = checkTimeout(opts.timeoutSeconds ?? DEFAULT_TIMEOUT);
    const [env, secretEnv] = splitEnv(opts.env);
    const outputLimit = opts.outputLimit ?? DEFAULT_OUTPUT_LIMIT;
    if (!Number.isInteger(outputLimit) || outputLimit <= 0 || outputLimit > DEFAULT_OUTPUT_LIMIT) {
      throw new InvalidArgument(`outputLimit is 1 to ${DEFAULT_OUTPUT_LIMIT} bytes`);
    }
    const check = opts.check === true;
    const req = {
      argv: args,
      env,
      cwd: opts.cwd ?? null,
      user: opts.user ?? null,
      stdin: checkStdin(opts.stdin),
      timeout,
      outputLimit,
      secretEnv,
    };
    return finish(await this.sb.backend.run(this.sb.key, req, check), args, timeout, check);
  }

  /**
   * Start in the background and return at once. `stdinOpen: true` keeps stdin open for
   * `sendStdin`; otherwise the process sees end-of-file after `stdin`.
   */
  async start(argv: Argv, opts: StartOptions = {}): Promise<CommandHandle> {
    const args = checkArgv(argv);
    const [env, secretEnv] = splitEnv(opts.env);
    const req = {
      argv: args,
      env,
      cwd: opts.cwd ?? null,
      user: opts.user ?? null,
      stdin: checkStdin(opts.stdin),
      stdinOpen: opts.stdinOpen === true,
      secretEnv,
    };
    const view = await this.sb.backend.start(this.sb.key, req);
    return new CommandHandle(this.sb, view, req.stdinOpen);
  }
}

/**
 * A background process in the guest: `pid`, `wait()`, `kill()`, `sendStdin()`, and
 * `stdout`/`stderr` async iterables of byte chunks (from the guest's 1 MiB rings).
 */
export class CommandHandle {
  readonly proc: number;
  readonly pid: number;
  readonly argv: string[];
  readonly auditId: string | null;
  private stdinOpen: boolean;

  constructor(
    private readonly sb: Target,
    view: ProcView,
    stdinOpen: boolean,
  ) {
    this.proc = view.proc;
    this.pid = view.pid;
    this.argv = [...view.argv];
    this.auditId = view.auditId;
    this.stdinOpen = stdinOpen;
  }

  /** The process's current view (running, exitCode, ...), without waiting. */
  status(): Promise<ProcView> {
    return this.sb.backend.procWait(this.sb.key, this.proc, 0);
  }

  /** Wait for the end; CommandTimeout (the process keeps running) past the bound. */
  async wait(opts: { timeoutSeconds?: Duration } | Duration = {}): Promise<CommandResult> {
    const raw = typeof opts === "object" ? opts.timeoutSeconds : opts;
    const timeout = checkTimeout(raw ?? DEFAULT_TIMEOUT);
    const { backend: be, key } = this.sb;
    const view = await be.procWait(key, this.proc, timeout);
    if (view.running) {
      throw new CommandTimeout(`process ${this.proc} (${this.argv[0]}) still runs after ${timeout}s`, {
        hint: "wait again, or kill() it",
        data: { proc: this.proc, timeout_seconds: timeout },
      });
    }
    const out = await be.procOutput(key, this.proc, "stdout");
    const err = await be.procOutput(key, this.proc, "stderr");
    return new CommandResult({
      exitCode: view.exitCode ?? -1,
      stdoutBytes: out,
      stderrBytes: err,
      auditId: view.auditId,
      signal: view.signal,
      duration: (view.ended ?? view.started) - view.started,
      placeholder: be.recording,
    });
  }

  /** Send `signal` (default SIGKILL) to the process. */
  async kill(signal = 9): Promise<void> {
    if (!Number.isInteger(signal) || signal < 1 || signal > 64) {
      throw new InvalidArgument(`signal must be 1..64, not ${String(signal)}`);
    }
    await this.sb.backend.procSignal(this.sb.key, this.proc, signal);
  }

  /** Write to the process's stdin (needs `start(..., { stdinOpen: true })`). */
  async sendStdin(data: Data, opts: { eof?: boolean } | boolean = {}): Promise<void> {
    const eof = typeof opts === "boolean" ? opts : opts.eof === true;
    if (!this.stdinOpen) {
      throw new InvalidArgument("this process was started without stdinOpen: true", { data: { proc: this.proc } });
    }
    const body = asBytes(data);
    if (body.length > MAX_BODY) throw new InvalidArgument(`sendStdin takes at most ${MAX_BODY >> 20} MiB at once`);
    await this.sb.backend.procStdin(this.sb.key, this.proc, body, eof);
    if (eof) this.stdinOpen = false;
  }

  closeStdin(): Promise<void> {
    return this.sendStdin("", { eof: true });
  }

  get stdout(): AsyncIterable<Buffer> {
    return this.stream("stdout");
  }

  get stderr(): AsyncIterable<Buffer> {
    return this.stream("stderr");
  }

  /** Chunks as they come, until the process has ended and its output is read. */
  private async *stream(stream: "stdout" | "stderr"): AsyncGenerator<Buffer> {
    const { backend: be, key } = this.sb;
    if (be.recording) {
      await be.procOutput(key, this.proc, stream);
      return;
    }
    let seen = 0;
    for (;;) {
      const view = await be.procWait(key, this.proc, POLL_SECONDS);
      const total = stream === "stdout" ? view.stdoutBytes : view.stderrBytes;
      if (total > seen) {
        const data = await be.procOutput(key, this.proc, stream);
        const start = Math.max(0, total - data.length); // bytes before the ring are gone
        const chunk = data.subarray(Math.max(0, seen - start));
        seen = Math.max(total, start + data.length);
        if (chunk.length) yield Buffer.from(chunk);
      } else if (!view.running) {
        return;
      }
    }
  }
}
