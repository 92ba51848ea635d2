/** Live mode: every operation is performed by mvmd over its HTTP API (`transport.ts`). */
import * as fs from "node:fs";
import { CommandResult, type Backend } from "./backend.js";
import { AgentError, MvmError, SandboxNotFound, errorFromBody, isErrorBody } from "./errors.js";
import {
  toFileEntry,
  toFileStat,
  toForward,
  toLogEvent,
  toProcView,
  toSandboxInfo,
  toSnapshotInfo,
  type ExecRequest,
  type FileEntry,
  type FileStat,
  type ForwardInfo,
  type LogEvent,
  type PortSpec,
  type ProcStart,
  type ProcView,
  type SandboxInfo,
  type SandboxShape,
  type SandboxSpec,
  type SnakeKeys,
  type SnapshotInfo,
} from "./models.js";
import { createHash } from "node:crypto";
import { Transport, route } from "./transport.js";

const sha256 = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");
const b64 = (b: Uint8Array): string => Buffer.from(b).toString("base64");

export class LiveBackend implements Backend {
  readonly recording = false;
  private _t: Transport | null;

  constructor(transport?: Transport) {
    this._t = transport ?? null;
  }

  get t(): Transport {
    if (this._t === null) this._t = new Transport();
    return this._t;
  }

  // -- sandboxes ---------------------------------------------------------------------
  async create(spec: SandboxSpec): Promise<SandboxInfo> {
    // mvmd's create body (`CreateSandbox`): the shape, the name, and the included host
    // roots as `uploads`, which mvmd checks against the policy's mount_roots before booting.
    const body: SnakeKeys<SandboxShape> & { name: string | null; uploads: string[] } = {
      name: spec.name,
      image: spec.image,
      cpus: spec.cpus,
      memory_mb: spec.memoryMb,
      disk_mb: spec.diskMb,
      ttl_seconds: spec.ttlSeconds,
      env: spec.env,
      secret_env: spec.secretEnv,
      network: spec.network,
      workload_id: spec.workloadId,
      tags: spec.tags,
      uploads: spec.mounts,
    };
    const info = toSandboxInfo(await this.t.json("POST", route("sandboxes"), { json: body, timeout: 600 }));
    try {
      await this.copyIncludes(info.name, spec);
    } catch (err) {
      try {
        await this.t.request("DELETE", route("sandboxes", info.name), { timeout: 60 });
      } catch {
        // the include error is the one to report
      }
      throw err;
    }
    return info;
  }

  private async copyIncludes(name: string, spec: SandboxSpec): Promise<void> {
    const made = new Set<string>();
    for (const inc of spec.includes) {
      const data = fs.readFileSync(inc.source);
      if (data.length !== inc.size || sha256(data) !== inc.sha256) {
        throw new MvmError(`include: ${inc.rel} changed while it was being copied`, { data: { path: inc.rel } });
      }
      const guest = `/work/${inc.rel}`;
      const parent = guest.slice(0, guest.lastIndexOf("/"));
      if (!made.has(parent)) {
        await this.mkdir(name, parent, true);
        made.add(parent);
      }
      await this.t.request("PUT", route("sandboxes", name, "files"), {
        query: { path: guest, mode: inc.mode },
        body: data,
      });
    }
  }

  async connect(name: string): Promise<SandboxInfo> {
    return this.info(name);
  }

  async listSandboxes(): Promise<SandboxInfo[]> {
    const list = await this.t.json<unknown[]>("GET", route("sandboxes"));
    return Array.isArray(list) ? list.map(toSandboxInfo) : [];
  }

  async info(sb: string): Promise<SandboxInfo> {
    return toSandboxInfo(await this.t.json("GET", route("sandboxes", sb)));
  }

  async setTtl(sb: string, ttlSeconds: number): Promise<SandboxInfo> {
    return toSandboxInfo(await this.t.json("POST", route("sandboxes", sb, "ttl"), { json: { ttl_seconds: ttlSeconds } }));
  }

  async pause(sb: string): Promise<SandboxInfo> {
    return toSandboxInfo(await this.t.json("POST", route("sandboxes", sb, "pause")));
  }

  async resume(sb: string): Promise<SandboxInfo> {
    return toSandboxInfo(await this.t.json("POST", route("sandboxes", sb, "resume")));
  }

  async snapshot(sb: string, name: string): Promise<SnapshotInfo> {
    return toSnapshotInfo(
      await this.t.json("POST", route("sandboxes", sb, "snapshots"), { json: { name }, timeout: 600 }),
    );
  }

  async restore(sb: string, snapshot: string): Promise<SandboxInfo> {
    let info = toSandboxInfo(
      await this.t.json("POST", route("sandboxes", sb, "snapshots", snapshot, "restore"), { timeout: 600 }),
    );
    if (info.state === "paused") info = await this.resume(sb);
    return info;
  }

  async stop(sb: string): Promise<void> {
    await this.t.request("DELETE", route("sandboxes", sb), { timeout: 60 });
  }

  async destroy(sb: string): Promise<void> {
    try {
      await this.stop(sb);
    } catch (err) {
      if (!(err instanceof SandboxNotFound)) throw err;
    }
    let snaps: unknown[];
    try {
      snaps = await this.t.json<unknown[]>("GET", route("sandboxes", sb, "snapshots"));
    } catch (err) {
      // `mvmctl serve` answers for a tenant's name only while it has a VM or snapshots:
      // "no sandbox or snapshots named ..." means nothing of it is left, which is the goal
      if (err instanceof SandboxNotFound) return;
      throw err;
    }
    for (const s of Array.isArray(snaps) ? snaps.map(toSnapshotInfo) : []) {
      await this.t.request("DELETE", route("sandboxes", sb, "snapshots", s.name));
    }
  }

  // -- commands ----------------------------------------------------------------------
  async run(sb: string, req: ExecRequest): Promise<CommandResult> {
    const body = {
      argv: req.argv,
      env: req.env,
      cwd: req.cwd,
      user: req.user,
      stdin: b64(req.stdin),
      timeout: req.timeout,
      output_limit: req.outputLimit,
      secret_env: req.secretEnv,
    };
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let end: Record<string, unknown> | null = null;
    for await (const line of this.t.lines("POST", route("sandboxes", sb, "exec"), {
      json: body,
      timeout: req.timeout + 60,
    })) {
      const ev = (typeof line === "object" && line !== null ? line : {}) as Record<string, unknown>;
      const data = typeof ev.data === "string" ? Buffer.from(ev.data, "base64") : Buffer.alloc(0);
      if (ev.type === "stdout") out.push(data);
      else if (ev.type === "stderr") err.push(data);
      else if (ev.type === "exit") end = ev;
      else if (ev.type === "error" && isErrorBody(ev.error)) throw errorFromBody(ev.error);
    }
    if (end === null) throw new MvmError("mvmd ended the exec stream without an exit event");
    return new CommandResult({
      exitCode: typeof end.exit_code === "number" ? end.exit_code : -1,
      stdoutBytes: Buffer.concat(out),
      stderrBytes: Buffer.concat(err),
      auditId: typeof end.audit_id === "string" ? end.audit_id : null,
      truncated: end.truncated_stdout === true || end.truncated_stderr === true,
      timedOut: end.timed_out === true,
      signal: typeof end.signal === "number" ? end.signal : null,
      duration: typeof end.duration === "number" ? end.duration : 0,
    });
  }

  async start(sb: string, req: ProcStart): Promise<ProcView> {
    const body = {
      argv: req.argv,
      env: req.env,
      cwd: req.cwd,
      user: req.user,
      stdin: b64(req.stdin),
      stdin_open: req.stdinOpen,
      secret_env: req.secretEnv,
    };
    return toProcView(await this.t.json("POST", route("sandboxes", sb, "procs"), { json: body }));
  }

  async procWait(sb: string, proc: number, timeout: number): Promise<ProcView> {
    return toProcView(
      await this.t.json("POST", route("sandboxes", sb, "procs", proc, "wait"), {
        query: { timeout },
        timeout: timeout + 30,
      }),
    );
  }

  async procSignal(sb: string, proc: number, signal: number): Promise<ProcView> {
    return toProcView(await this.t.json("POST", route("sandboxes", sb, "procs", proc, "signal"), { query: { signal } }));
  }

  async procStdin(sb: string, proc: number, data: Uint8Array, eof: boolean): Promise<void> {
    await this.t.request("POST", route("sandboxes", sb, "procs", proc, "stdin"), { query: { eof }, body: data });
  }

  async procOutput(sb: string, proc: number, stream: "stdout" | "stderr"): Promise<Buffer> {
    return (await this.t.request("GET", route("sandboxes", sb, "procs", proc, "output"), { query: { stream } })).body;
  }

  // -- files -------------------------------------------------------------------------
  async write(sb: string, path: string, data: Uint8Array, mode: number): Promise<void> {
    const put = (): Promise<unknown> =>
      this.t.request("PUT", route("sandboxes", sb, "files"), { query: { path, mode }, body: data });
    try {
      await put();
    } catch (err) {
      const parent = path.slice(0, path.lastIndexOf("/"));
      if (!(err instanceof AgentError) || err.data.code !== "not_found" || !parent) throw err;
      await this.mkdir(sb, parent, true);
      await put();
    }
  }

  async read(sb: string, path: string): Promise<Buffer> {
    return (await this.t.request("GET", route("sandboxes", sb, "files"), { query: { path } })).body;
  }

  async listDir(sb: string, path: string): Promise<FileEntry[]> {
    const list = await this.t.json<unknown[]>("GET", route("sandboxes", sb, "files", "list"), { query: { path } });
    return Array.isArray(list) ? list.map(toFileEntry) : [];
  }

  async stat(sb: string, path: string): Promise<FileStat> {
    return toFileStat(await this.t.json("GET", route("sandboxes", sb, "files", "stat"), { query: { path } }));
  }

  async mkdir(sb: string, path: string, parents: boolean): Promise<void> {
    await this.t.request("POST", route("sandboxes", sb, "files", "mkdir"), { query: { path, parents } });
  }

  async remove(sb: string, path: string, recursive: boolean): Promise<void> {
    await this.t.request("DELETE", route("sandboxes", sb, "files"), { query: { path, recursive } });
  }

  async rename(sb: string, src: string, dest: string): Promise<void> {
    await this.t.request("POST", route("sandboxes", sb, "files", "move"), { query: { path: src, dest } });
  }

  // -- logs and ports ----------------------------------------------------------------
  logs(sb: string, follow: boolean, since: number | null): AsyncIterable<LogEvent> {
    const t = this.t;
    return (async function* () {
      for await (const line of t.lines("GET", route("sandboxes", sb, "logs"), {
        query: { follow, since },
        timeout: follow ? 24 * 3600 : 120,
      })) {
        yield toLogEvent(line);
      }
    })();
  }

  async forward(sb: string, spec: PortSpec): Promise<ForwardInfo> {
    const body = {
      guest_port: spec.guestPort,
      host_port: spec.hostPort,
      host: spec.host,
      allow_wildcard: spec.allowWildcard,
    };
    return toForward(await this.t.json("POST", route("sandboxes", sb, "forwards"), { json: body }));
  }

  async unforward(sb: string, forwardId: string): Promise<void> {
    await this.t.request("DELETE", route("sandboxes", sb, "forwards", forwardId));
  }
}
