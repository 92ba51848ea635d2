/**
 * Record mode: operations are written into the IR (`schemas/ir-v1.json`) instead of
 * performed; no VM starts. The same document the Python SDK's recorder writes, so
 * `mvmctl run --mode plan` (admission) and `mvmctl run --mode live DIR` (replay) read it
 * unchanged. Calls that would return guest data return placeholders that say so. Bytes
 * (file contents, stdin, included files) are stored by SHA-256 under `files/`; secret
 * values never appear, only names.
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { CommandResult, note, recordedBytes, type Backend } from "./backend.js";
import { ImageNotFound, InvalidArgument, SandboxNotFound } from "./errors.js";
import type * as M from "./models.js";
import { SDK_VERSION } from "./version.js";

/** Most bytes a recording may store (file writes, stdin, includes), summed. */
export const MAX_RECORDED_BYTES = 256 * 1024 * 1024;
/** The image names live mode would accept, given by `mvmctl` (JSON list) for a clear error. */
export const KNOWN_IMAGES_ENV = "MVM_SDK_KNOWN_IMAGES";

interface Blob {
  sha256: string;
  size: number;
}

/** A sandbox declaration of IR v1: the sandbox shape, as on the wire, plus its own facts. */
type SandboxDecl = M.SnakeKeys<M.SandboxShape> & {
  ref: string;
  name: string | null;
  includes: { path: string; sha256: string; size: number; mode: number }[];
  include_root: string | null;
  mounts: string[];
};

interface Operation {
  seq: number;
  op: string;
  sandbox: string | null;
  args: Record<string, unknown>;
}

export interface IR {
  format: "mvm-sdk-ir";
  version: 1;
  mvm_version: string;
  script: string | null;
  sandboxes: SandboxDecl[];
  operations: Operation[];
}

function knownImages(): string[] | null {
  const raw = process.env[KNOWN_IMAGES_ENV];
  if (!raw) return null;
  try {
    const v: unknown = JSON.parse(raw);
    return Array.isArray(v) ? v.filter((x): x is string => typeof x === "string") : null;
  } catch {
    return null;
  }
}

/** ImageNotFound worded as the Python SDK words it. */
export function imageNotFound(image: string, known: string[]): ImageNotFound {
  return new ImageNotFound(`unknown image '${image}'; known images: ${known.join(", ") || "none"}`, {
    hint: image.startsWith("python-3.")
      ? "use one of those names (python-3.12 is not available: no Debian suite mvm builds from ships it)"
      : "use one of those names, or build one with `mvmctl build`",
    data: { image, known },
  });
}

export class Recorder implements Backend {
  readonly recording = true;
  readonly ir: IR;
  saved = false;
  private refs = new Map<string, string>(); // sandbox name -> ref
  private decls = new Map<string, SandboxDecl>();
  private nref = 0;
  private procs = 0;
  private forwards = 0;
  private stored = 0;

  constructor(
    readonly outDir: string,
    script: string | null = null,
  ) {
    this.ir = { format: "mvm-sdk-ir", version: 1, mvm_version: SDK_VERSION, script, sandboxes: [], operations: [] };
  }

  // -- recording ---------------------------------------------------------------------
  private ref(sb: string): string {
    const ref = this.refs.get(sb);
    if (ref === undefined) throw new SandboxNotFound(`no sandbox '${sb}' in this recording`, { data: { sandbox: sb } });
    return ref;
  }

  private op(op: string, sb: string | null, args: Record<string, unknown> = {}): void {
    const ref = sb === null ? null : this.ref(sb);
    this.ir.operations.push({ seq: this.ir.operations.length, op, sandbox: ref, args });
  }

  private blob(data: Uint8Array): Blob {
    const digest = createHash("sha256").update(data).digest("hex");
    const dest = path.join(this.outDir, "files", digest);
    if (!fs.existsSync(dest)) {
      this.stored += data.length;
      if (this.stored > MAX_RECORDED_BYTES) {
        throw new InvalidArgument(`the recording holds more than ${MAX_RECORDED_BYTES >> 20} MiB of data`, {
          data: { max_bytes: MAX_RECORDED_BYTES },
        });
      }
      fs.mkdirSync(path.dirname(dest), { recursive: true });
      const tmp = path.join(path.dirname(dest), `.${digest}.tmp`);
      fs.writeFileSync(tmp, data);
      fs.renameSync(tmp, dest);
    }
    return { sha256: digest, size: data.length };
  }

  /** Write `ir.json` (atomically, synchronously: it runs from an exit handler too). */
  save(): string {
    fs.mkdirSync(this.outDir, { recursive: true });
    const dest = path.join(this.outDir, "ir.json");
    const tmp = path.join(this.outDir, `.ir.${process.pid}.tmp`);
    fs.writeFileSync(tmp, `${JSON.stringify(this.ir, null, 2)}\n`);
    fs.renameSync(tmp, dest);
    this.saved = true;
    return dest;
  }

  private infoOf(sb: string, state = "running"): M.SandboxInfo {
    const ref = this.ref(sb);
    const d = this.decls.get(ref);
    const now = Date.now() / 1000;
    return {
      id: `recorded-${ref}`,
      name: sb,
      image: d ? d.image : "unknown",
      state,
      cpus: d ? d.cpus : 0,
      memoryMb: d ? d.memory_mb : 0,
      diskMb: d ? (d.disk_mb ?? 0) : 0,
      created: now,
      expiresAt: now + (d ? d.ttl_seconds : 0),
      ttlLeft: d ? d.ttl_seconds : 0,
      pid: null,
      reason: "",
      bootSeconds: null,
      network: d ? { preset: d.network.preset, allow: [...d.network.allow] } : { preset: "none", allow: [] },
      forwards: [],
      workloadId: d ? d.workload_id : null,
      tags: d ? { ...d.tags } : {},
      auditId: null,
    };
  }

  // -- sandboxes ---------------------------------------------------------------------
  async create(spec: M.SandboxSpec): Promise<M.SandboxInfo> {
    return this.createSync(spec);
  }

  createSync(spec: M.SandboxSpec): M.SandboxInfo {
    const known = knownImages();
    if (known !== null && !known.includes(spec.image)) throw imageNotFound(spec.image, known);
    const includes = spec.includes.map((inc) => {
      const b = this.blob(fs.readFileSync(inc.source));
      if (b.sha256 !== inc.sha256) throw new InvalidArgument(`include: ${inc.rel} changed while it was recorded`);
      return { path: inc.rel, sha256: inc.sha256, size: inc.size, mode: inc.mode };
    });
    const ref = `sb${this.nref++}`;
    const name = spec.name ?? `recorded-${ref}`;
    if (this.refs.has(name)) throw new InvalidArgument(`the script creates two sandboxes named '${name}'`);
    const decl: SandboxDecl = {
      ref,
      name: spec.name,
      image: spec.image,
      workload_id: spec.workloadId,
      ttl_seconds: spec.ttlSeconds,
      cpus: spec.cpus,
      memory_mb: spec.memoryMb,
      disk_mb: spec.diskMb,
      network: { preset: spec.network.preset, allow: [...spec.network.allow] },
      env: { ...spec.env },
      secret_env: { ...spec.secretEnv },
      tags: { ...spec.tags },
      includes,
      include_root: spec.includeRoot,
      mounts: [...spec.mounts],
    };
    this.ir.sandboxes.push(decl);
    this.decls.set(ref, decl);
    this.refs.set(name, ref);
    this.op("sandbox.create", name, { ref });
    return this.infoOf(name);
  }

  async connect(name: string): Promise<M.SandboxInfo> {
    if (!this.refs.has(name)) this.refs.set(name, `sb${this.nref++}`);
    this.op("sandbox.connect", name, { ref: this.ref(name), name });
    return this.infoOf(name);
  }

  async listSandboxes(): Promise<M.SandboxInfo[]> {
    this.op("sandbox.list", null);
    return [];
  }

  async info(sb: string): Promise<M.SandboxInfo> {
    return this.infoOf(sb);
  }

  async setTtl(sb: string, ttlSeconds: number): Promise<M.SandboxInfo> {
    this.op("sandbox.set_ttl", sb, { ttl_seconds: ttlSeconds });
    return this.infoOf(sb);
  }

  async pause(sb: string): Promise<M.SandboxInfo> {
    this.op("sandbox.pause", sb);
    return this.infoOf(sb, "paused");
  }

  async resume(sb: string): Promise<M.SandboxInfo> {
    this.op("sandbox.resume", sb);
    return this.infoOf(sb);
  }

  async snapshot(sb: string, name: string): Promise<M.SnapshotInfo> {
    this.op("sandbox.snapshot", sb, { name });
    return { sandbox: sb, name, created: Date.now() / 1000, size: 0, image: this.infoOf(sb).image, auditId: null };
  }

  async restore(sb: string, snapshot: string): Promise<M.SandboxInfo> {
    this.op("sandbox.restore", sb, { snapshot });
    return this.infoOf(sb);
  }

  async stop(sb: string): Promise<void> {
    this.stopSync(sb);
  }

  stopSync(sb: string): void {
    this.op("sandbox.stop", sb);
  }

  async destroy(sb: string): Promise<void> {
    this.op("sandbox.destroy", sb);
  }

  // -- commands ----------------------------------------------------------------------
  async run(sb: string, req: M.ExecRequest, check: boolean): Promise<CommandResult> {
    const args: Record<string, unknown> = {
      argv: req.argv,
      env: req.env,
      cwd: req.cwd,
      user: req.user,
      timeout: req.timeout,
      output_limit: req.outputLimit,
      secret_env: req.secretEnv,
    };
    if (req.stdin.length) args.stdin = this.blob(req.stdin);
    args.check = check;
    this.op("commands.run", sb, args);
    return new CommandResult({
      exitCode: 0,
      stdoutBytes: Buffer.from(note(`the output of ${JSON.stringify(req.argv)}`)),
      placeholder: true,
    });
  }

  async start(sb: string, req: M.ProcStart): Promise<M.ProcView> {
    const proc = ++this.procs;
    const args: Record<string, unknown> = {
      proc,
      argv: req.argv,
      env: req.env,
      cwd: req.cwd,
      user: req.user,
      stdin_open: req.stdinOpen,
      secret_env: req.secretEnv,
    };
    if (req.stdin.length) args.stdin = this.blob(req.stdin);
    this.op("commands.start", sb, args);
    return view(proc, req.argv, true, null, null);
  }

  async procWait(sb: string, proc: number, timeout: number): Promise<M.ProcView> {
    this.op("proc.wait", sb, { proc, timeout });
    return view(proc, [], false, 0, null);
  }

  async procSignal(sb: string, proc: number, signal: number): Promise<M.ProcView> {
    this.op("proc.signal", sb, { proc, signal });
    return view(proc, [], false, null, signal);
  }

  async procStdin(sb: string, proc: number, data: Uint8Array, eof: boolean): Promise<void> {
    this.op("proc.stdin", sb, { proc, data: this.blob(data), eof });
  }

  async procOutput(sb: string, proc: number, stream: "stdout" | "stderr"): Promise<Buffer> {
    this.op("proc.output", sb, { proc, stream });
    return recordedBytes(`the ${stream} of process ${proc}`);
  }

  // -- files -------------------------------------------------------------------------
  async write(sb: string, p: string, data: Uint8Array, mode: number): Promise<void> {
    this.op("files.write", sb, { path: p, data: this.blob(data), mode });
  }

  async read(sb: string, p: string): Promise<Buffer> {
    this.op("files.read", sb, { path: p });
    return recordedBytes(`the contents of ${p}`);
  }

  async listDir(sb: string, p: string): Promise<M.FileEntry[]> {
    this.op("files.list", sb, { path: p });
    return [];
  }

  async stat(sb: string, p: string): Promise<M.FileStat> {
    this.op("files.stat", sb, { path: p });
    return { type: "file", size: 0, mode: 0o644, mtime: Date.now() / 1000, uid: 0, gid: 0, auditId: null };
  }

  async mkdir(sb: string, p: string, parents: boolean): Promise<void> {
    this.op("files.mkdir", sb, { path: p, parents });
  }

  async remove(sb: string, p: string, recursive: boolean): Promise<void> {
    this.op("files.remove", sb, { path: p, recursive });
  }

  async rename(sb: string, src: string, dest: string): Promise<void> {
    this.op("files.rename", sb, { src, dest });
  }

  // -- logs and ports ----------------------------------------------------------------
  logs(sb: string, follow: boolean, since: number | null): AsyncIterable<M.LogEvent> {
    this.op("logs", sb, { follow, since });
    return (async function* () {})();
  }

  async forward(sb: string, spec: M.PortSpec): Promise<M.ForwardInfo> {
    const id = `recorded-fwd${++this.forwards}`;
    this.op("ports.forward", sb, {
      id,
      guest_port: spec.guestPort,
      host_port: spec.hostPort,
      host: spec.host,
      allow_wildcard: spec.allowWildcard,
    });
    return { id, host: spec.host, hostPort: spec.hostPort, guestPort: spec.guestPort, auditId: null };
  }

  async unforward(sb: string, forwardId: string): Promise<void> {
    this.op("ports.close", sb, { id: forwardId });
  }
}

function view(proc: number, argv: string[], running: boolean, exitCode: number | null, signal: number | null): M.ProcView {
  const now = Date.now() / 1000;
  return {
    proc,
    pid: 0,
    argv,
    running,
    started: now,
    exitCode,
    signal,
    ended: running ? null : now,
    stdoutBytes: 0,
    stderrBytes: 0,
    auditId: null,
  };
}
