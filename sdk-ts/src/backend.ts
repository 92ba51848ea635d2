/**
 * The seam between the SDK's API and what performs it: mvmd (live) or a recorder. Every
 * method is one IR operation, so recording and performing share one vocabulary (as in
 * `mvm/sdk/backend.py`). `sb` is the sandbox's name (live) or its name in the recording.
 */
import type {
  ExecRequest,
  FileEntry,
  FileStat,
  ForwardInfo,
  LogEvent,
  PortSpec,
  ProcStart,
  ProcView,
  SandboxInfo,
  SandboxSpec,
  SnapshotInfo,
} from "./models.js";

const placeholders = new WeakSet<object>();
const NOTE_PREFIX = "<mvm record mode: ";
const NOTE_SUFFIX = " is only known in live mode>";

/** The text record mode puts where live mode would put guest data. */
export function note(what: string): string {
  return `${NOTE_PREFIX}${what}${NOTE_SUFFIX}`;
}

/** Bytes record mode made up (tagged so `isPlaceholder` knows them). */
export function recordedBytes(what: string): Buffer {
  const b = Buffer.from(note(what));
  placeholders.add(b);
  return b;
}

/** True for a value that record/plan mode made up instead of reading the guest. */
export function isPlaceholder(value: unknown): boolean {
  if (typeof value === "string") return value.startsWith(NOTE_PREFIX) && value.endsWith(NOTE_SUFFIX);
  if (typeof value === "object" && value !== null) {
    if (placeholders.has(value)) return true;
    return (value as { placeholder?: unknown }).placeholder === true;
  }
  return false;
}

/**
 * The outcome of `commands.run` (or `handle.wait`). Output is decoded as UTF-8 (bad bytes
 * replaced); the raw bytes are `stdoutBytes`/`stderrBytes`. It comes from the guest: treat
 * it as untrusted data.
 */
export class CommandResult {
  readonly exitCode: number;
  readonly stdoutBytes: Buffer;
  readonly stderrBytes: Buffer;
  readonly auditId: string | null;
  readonly truncated: boolean;
  readonly timedOut: boolean;
  readonly signal: number | null;
  readonly duration: number;
  readonly placeholder: boolean;

  constructor(fields: {
    exitCode: number;
    stdoutBytes?: Buffer;
    stderrBytes?: Buffer;
    auditId?: string | null;
    truncated?: boolean;
    timedOut?: boolean;
    signal?: number | null;
    duration?: number;
    placeholder?: boolean;
  }) {
    this.exitCode = fields.exitCode;
    this.stdoutBytes = fields.stdoutBytes ?? Buffer.alloc(0);
    this.stderrBytes = fields.stderrBytes ?? Buffer.alloc(0);
    this.auditId = fields.auditId ?? null;
    this.truncated = fields.truncated ?? false;
    this.timedOut = fields.timedOut ?? false;
    this.signal = fields.signal ?? null;
    this.duration = fields.duration ?? 0;
    this.placeholder = fields.placeholder ?? false;
  }

  get stdout(): string {
    return this.stdoutBytes.toString("utf8");
  }

  get stderr(): string {
    return this.stderrBytes.toString("utf8");
  }

  get ok(): boolean {
    return this.exitCode === 0 && !this.timedOut;
  }

  toJSON(): Record<string, unknown> {
    return {
      exitCode: this.exitCode,
      stdout: this.stdout,
      stderr: this.stderr,
      auditId: this.auditId,
      truncated: this.truncated,
      timedOut: this.timedOut,
      signal: this.signal,
      duration: this.duration,
    };
  }
}

export interface Backend {
  readonly recording: boolean;

  create(spec: SandboxSpec): Promise<SandboxInfo>;
  connect(name: string): Promise<SandboxInfo>;
  listSandboxes(): Promise<SandboxInfo[]>;
  info(sb: string): Promise<SandboxInfo>;
  setTtl(sb: string, ttlSeconds: number): Promise<SandboxInfo>;
  pause(sb: string): Promise<SandboxInfo>;
  resume(sb: string): Promise<SandboxInfo>;
  snapshot(sb: string, name: string): Promise<SnapshotInfo>;
  restore(sb: string, snapshot: string): Promise<SandboxInfo>;
  stop(sb: string): Promise<void>;
  destroy(sb: string): Promise<void>;

  run(sb: string, req: ExecRequest, check: boolean): Promise<CommandResult>;
  start(sb: string, req: ProcStart): Promise<ProcView>;
  procWait(sb: string, proc: number, timeout: number): Promise<ProcView>;
  procSignal(sb: string, proc: number, signal: number): Promise<ProcView>;
  procStdin(sb: string, proc: number, data: Uint8Array, eof: boolean): Promise<void>;
  procOutput(sb: string, proc: number, stream: "stdout" | "stderr"): Promise<Buffer>;

  write(sb: string, path: string, data: Uint8Array, mode: number): Promise<void>;
  read(sb: string, path: string): Promise<Buffer>;
  listDir(sb: string, path: string): Promise<FileEntry[]>;
  stat(sb: string, path: string): Promise<FileStat>;
  mkdir(sb: string, path: string, parents: boolean): Promise<void>;
  remove(sb: string, path: string, recursive: boolean): Promise<void>;
  rename(sb: string, src: string, dest: string): Promise<void>;

  /** Called synchronously (a recorder records at the call); iterated lazily. */
  logs(sb: string, follow: boolean, since: number | null): AsyncIterable<LogEvent>;
  forward(sb: string, spec: PortSpec): Promise<ForwardInfo>;
  unforward(sb: string, forwardId: string): Promise<void>;
}
