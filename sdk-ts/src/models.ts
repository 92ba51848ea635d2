/**
 * The values the SDK returns, in camelCase, made from mvmd's snake_case JSON
 * (`src/mvm/api/models.py`). Everything here came over the wire, and much of it from a
 * guest: fields are read by type, never trusted to be there.
 */

type Wire = Record<string, unknown>;

const str = (v: unknown, d = ""): string => (typeof v === "string" ? v : d);
const num = (v: unknown, d = 0): number => (typeof v === "number" && Number.isFinite(v) ? v : d);
const optNum = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);
const optStr = (v: unknown): string | null => (typeof v === "string" ? v : null);
const strMap = (v: unknown): Record<string, string> => {
  const out: Record<string, string> = {};
  if (typeof v === "object" && v !== null) {
    for (const [k, x] of Object.entries(v)) if (typeof x === "string") out[k] = x;
  }
  return out;
};
const obj = (v: unknown): Wire => (typeof v === "object" && v !== null ? (v as Wire) : {});

export interface NetworkSpec {
  preset: string;
  allow: string[];
}

export interface ForwardInfo {
  id: string;
  host: string;
  hostPort: number;
  guestPort: number;
  auditId: string | null;
}

export interface SandboxInfo {
  id: string;
  name: string;
  image: string;
  state: string;
  cpus: number;
  memoryMb: number;
  diskMb: number;
  created: number;
  expiresAt: number;
  ttlLeft: number;
  pid: number | null;
  reason: string;
  bootSeconds: number | null;
  network: NetworkSpec;
  forwards: ForwardInfo[];
  workloadId: string | null;
  tags: Record<string, string>;
  auditId: string | null;
}

export interface ProcView {
  proc: number;
  pid: number;
  argv: string[];
  running: boolean;
  started: number;
  exitCode: number | null;
  signal: number | null;
  ended: number | null;
  stdoutBytes: number;
  stderrBytes: number;
  auditId: string | null;
}

export interface FileEntry {
  name: string;
  type: string;
  size: number;
  mode: number;
  mtime: number;
}

export interface FileStat {
  type: string;
  size: number;
  mode: number;
  mtime: number;
  uid: number;
  gid: number;
  auditId: string | null;
}

export interface LogEvent {
  timestamp: number;
  /** "console", or "proc:<id>:stdout" / "proc:<id>:stderr". */
  stream: string;
  message: string;
}

export interface SnapshotInfo {
  sandbox: string;
  name: string;
  created: number;
  size: number;
  image: string;
  auditId: string | null;
}

export function toForward(v: unknown): ForwardInfo {
  const w = obj(v);
  return {
    id: str(w.id),
    host: str(w.host),
    hostPort: num(w.host_port),
    guestPort: num(w.guest_port),
    auditId: optStr(w.audit_id),
  };
}

export function toNetwork(v: unknown): NetworkSpec {
  const w = obj(v);
  return {
    preset: str(w.preset, "none"),
    allow: Array.isArray(w.allow) ? w.allow.filter((x): x is string => typeof x === "string") : [],
  };
}

export function toSandboxInfo(v: unknown): SandboxInfo {
  const w = obj(v);
  return {
    id: str(w.id),
    name: str(w.name),
    image: str(w.image),
    state: str(w.state),
    cpus: num(w.cpus),
    memoryMb: num(w.memory_mb),
    diskMb: num(w.disk_mb),
    created: num(w.created),
    expiresAt: num(w.expires_at),
    ttlLeft: num(w.ttl_left),
    pid: optNum(w.pid),
    reason: str(w.reason),
    bootSeconds: optNum(w.boot_seconds),
    network: toNetwork(w.network),
    forwards: Array.isArray(w.forwards) ? w.forwards.map(toForward) : [],
    workloadId: optStr(w.workload_id),
    tags: strMap(w.tags),
    auditId: optStr(w.audit_id),
  };
}

export function toProcView(v: unknown): ProcView {
  const w = obj(v);
  return {
    proc: num(w.proc),
    pid: num(w.pid),
    argv: Array.isArray(w.argv) ? w.argv.filter((x): x is string => typeof x === "string") : [],
    running: w.running === true,
    started: num(w.started),
    exitCode: optNum(w.exit_code),
    signal: optNum(w.signal),
    ended: optNum(w.ended),
    stdoutBytes: num(w.stdout_bytes),
    stderrBytes: num(w.stderr_bytes),
    auditId: optStr(w.audit_id),
  };
}

export function toFileEntry(v: unknown): FileEntry {
  const w = obj(v);
  return { name: str(w.name), type: str(w.type), size: num(w.size), mode: num(w.mode), mtime: num(w.mtime) };
}

export function toFileStat(v: unknown): FileStat {
  const w = obj(v);
  return {
    type: str(w.type),
    size: num(w.size),
    mode: num(w.mode),
    mtime: num(w.mtime),
    uid: num(w.uid),
    gid: num(w.gid),
    auditId: optStr(w.audit_id),
  };
}

export function toLogEvent(v: unknown): LogEvent {
  const w = obj(v);
  return { timestamp: num(w.timestamp), stream: str(w.stream), message: str(w.message) };
}

export function toSnapshotInfo(v: unknown): SnapshotInfo {
  const w = obj(v);
  return {
    sandbox: str(w.sandbox),
    name: str(w.name),
    created: num(w.created),
    size: num(w.size),
    image: str(w.image),
    auditId: optStr(w.audit_id),
  };
}

/**
 * The sandbox shape (`SandboxShape` in `src/mvm/api/models.py`), in camelCase: the fields
 * the SDK sets (mvmd's `ports` and `kind` keep their defaults). The IR's declaration is
 * this shape in snake_case (`record.ts`), mvmd's create body too (`live.ts`).
 */
export interface SandboxShape {
  image: string;
  cpus: number;
  memoryMb: number;
  diskMb: number | null;
  ttlSeconds: number;
  env: Record<string, string>;
  secretEnv: Record<string, string>;
  network: NetworkSpec;
  workloadId: string | null;
  tags: Record<string, string>;
}

/** `SandboxShape` with its keys as they are on the wire (`memoryMb` -> `memory_mb`). */
export type SnakeKeys<T> = { [K in keyof T as SnakeCase<K & string>]: T[K] };
type SnakeCase<S extends string> = S extends `${infer H}${infer T}`
  ? `${H extends Uppercase<H> ? (H extends Lowercase<H> ? H : `_${Lowercase<H>}`) : H}${SnakeCase<T>}`
  : S;

/** What `Sandbox.create` asks for, validated: the shape plus the name and the files to copy in. */
export interface SandboxSpec extends SandboxShape {
  name: string | null;
  includes: IncludeFile[];
  /** Host directories the includes come from (plan mode's admission checks them). */
  mounts: string[];
  includeRoot: string | null;
}

/** One host file `include` copies to `/work/<rel>`. */
export interface IncludeFile {
  rel: string;
  sha256: string;
  size: number;
  mode: number;
  source: string;
}

/** A command as mvmd's exec takes it (`ExecRequest`), minus stdin. */
export interface ExecRequest {
  argv: string[];
  env: Record<string, string>;
  cwd: string | null;
  user: string | null;
  stdin: Uint8Array;
  timeout: number;
  outputLimit: number;
  secretEnv: Record<string, string>;
}

export interface ProcStart {
  argv: string[];
  env: Record<string, string>;
  cwd: string | null;
  user: string | null;
  stdin: Uint8Array;
  stdinOpen: boolean;
  secretEnv: Record<string, string>;
}

export interface PortSpec {
  guestPort: number;
  hostPort: number;
  host: string;
  allowWildcard: boolean;
}
