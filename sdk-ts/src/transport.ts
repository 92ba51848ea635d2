/**
 * HTTP to mvmd: over its Unix socket (`$MVM_HOME/mvmd.sock`, started on demand as the
 * Python client does), or to `mvmctl serve` when `MVM_URL` (and `MVM_TOKEN`) are set.
 * Only `node:http`/`node:https`. Error answers are JSON bodies turned into typed errors;
 * NDJSON streams are read line by line with a bound on each line.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import * as https from "node:https";
import * as os from "node:os";
import * as path from "node:path";
import { CommandTimeout, HostError, InvalidArgument, MvmError, errorFromBody, isErrorBody } from "./errors.js";

export const API_VERSION = "v1";
/** Seconds to wait for an auto-started daemon to answer. */
export const DAEMON_START_TIMEOUT = 30;
/** Default bound of a call that does not run commands (seconds). */
export const HTTP_TIMEOUT = 120;
/** Largest answer read into memory (a 64 MiB file read plus headroom) and one NDJSON line. */
export const MAX_RESPONSE = 64 * 1024 * 1024 + 1024 * 1024;
export const MAX_LINE = 32 * 1024 * 1024;

/** No keep-alive: an idle socket must never keep a finished script's process alive. */
const httpAgent = new http.Agent({ keepAlive: false });
const httpsAgent = new https.Agent({ keepAlive: false });

/**
 * Who the owner's calls act as in mvmd's audit records (`X-Mvm-Actor`, on the local socket
 * only: over `MVM_URL` the token is the actor): `Transport({ actor })`, else `MVM_ACTOR`;
 * unset, mvmd records them as `mvmd`. The same rule as the Python client (`mvm.client`).
 */
export const ACTOR_ENV = "MVM_ACTOR";
export const ACTOR_HEADER = "x-mvm-actor";
const ACTOR_RE = /^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$/;

export function checkActor(actor: string): string {
  if (typeof actor !== "string" || !ACTOR_RE.test(actor)) {
    throw new InvalidArgument(`invalid actor ${JSON.stringify(String(actor).slice(0, 80))}`, {
      hint: "letters, digits, '_', '.', ':', '@', '-' (64)",
    });
  }
  return actor;
}

export type Query = Record<string, string | number | boolean | null | undefined>;

export interface RequestOptions {
  query?: Query;
  json?: unknown;
  body?: Uint8Array;
  /** Seconds without progress before giving up. */
  timeout?: number;
}

export interface Response {
  status: number;
  body: Buffer;
}

/** `$MVM_HOME` as the Python side computes it (`paths.home()`). */
export function mvmHome(): string {
  const h = process.env.MVM_HOME;
  if (h) return path.resolve(h);
  const xdg = process.env.XDG_DATA_HOME;
  return path.join(xdg ? xdg : path.join(os.homedir(), ".local", "share"), "mvm");
}

export function socketPath(): string {
  return path.join(mvmHome(), "mvmd.sock");
}

function qs(query: Query | undefined): string {
  if (!query) return "";
  const parts: string[] = [];
  for (const [k, v] of Object.entries(query)) {
    if (v === undefined || v === null) continue;
    const s = typeof v === "boolean" ? (v ? "1" : "0") : String(v);
    parts.push(`${encodeURIComponent(k)}=${encodeURIComponent(s)}`);
  }
  return parts.length ? `?${parts.join("&")}` : "";
}

/** The URL path of a route: every name is one quoted segment. */
export function route(...segments: (string | number)[]): string {
  return `/${API_VERSION}/${segments.map((s) => encodeURIComponent(String(s))).join("/")}`;
}

/** `MVM_URL` (an `mvmctl serve` to talk to instead of the local socket), if set. */
function remoteUrl(raw: string): URL | null {
  const url = raw.trim();
  if (!url) return null;
  let parsed: URL | null = null;
  try {
    parsed = new URL(url);
  } catch {
    parsed = null;
  }
  if (parsed === null || (parsed.protocol !== "http:" && parsed.protocol !== "https:")) {
    throw new InvalidArgument(`MVM_URL ${JSON.stringify(url.slice(0, 200))} must start with http:// or https://`);
  }
  return parsed;
}

export class Transport {
  readonly remote: URL | null;
  readonly token: string | null;
  readonly socket: string;
  /** The `X-Mvm-Actor` label of this transport's calls on the local socket, if any. */
  readonly actor: string | null;
  autostart: boolean;
  private ensured = false;
  private starting: Promise<void> | null = null;

  constructor(
    opts: { url?: string | null; token?: string | null; autostart?: boolean; actor?: string | null } = {},
  ) {
    this.remote = remoteUrl(opts.url ?? process.env.MVM_URL ?? "");
    const token = (opts.token ?? process.env.MVM_TOKEN ?? "").trim();
    if (this.remote && !token) {
      // as the Python client: a server without a token can only answer 401
      throw new InvalidArgument("MVM_URL is set but MVM_TOKEN is not", {
        hint: "create one with `mvmctl token create`",
      });
    }
    this.token = token || null;
    const label = opts.actor ?? (process.env[ACTOR_ENV] ?? "").trim();
    this.actor = label ? checkActor(label) : null;
    this.socket = socketPath();
    this.autostart = opts.autostart ?? true;
    if (!this.remote) checkSocketOwner(this.socket);
  }

  private raw(method: string, urlPath: string, opts: RequestOptions): Promise<http.IncomingMessage> {
    const headers: Record<string, string> = { host: this.remote ? this.remote.host : "mvmd" };
    let payload: Uint8Array | undefined;
    if (opts.json !== undefined) {
      payload = Buffer.from(JSON.stringify(opts.json));
      headers["content-type"] = "application/json";
    } else if (opts.body !== undefined) {
      payload = opts.body;
      headers["content-type"] = "application/octet-stream";
    }
    headers["content-length"] = String(payload ? payload.length : 0);
    if (this.remote && this.token) headers.authorization = `Bearer ${this.token}`;
    if (!this.remote && this.actor !== null) headers[ACTOR_HEADER] = this.actor;
    const full = `${urlPath}${qs(opts.query)}`;
    const timeoutMs = (opts.timeout ?? HTTP_TIMEOUT) * 1000;
    return new Promise((resolve, reject) => {
      let req: http.ClientRequest;
      const onResponse = (res: http.IncomingMessage): void => resolve(res);
      if (this.remote) {
        const base = this.remote.pathname.replace(/\/+$/, "");
        const secure = this.remote.protocol === "https:";
        req = (secure ? https : http).request(
          {
            agent: secure ? httpsAgent : httpAgent,
            protocol: this.remote.protocol,
            hostname: this.remote.hostname,
            port: this.remote.port || undefined,
            method,
            path: `${base}${full}`,
            headers,
          },
          onResponse,
        );
      } else {
        req = http.request(
          { socketPath: this.socket, method, path: full, headers, agent: httpAgent },
          onResponse,
        );
      }
      req.setTimeout(timeoutMs, () => {
        req.destroy(new CommandTimeout(`mvmd did not answer ${method} ${urlPath} in time`));
      });
      req.on("error", (err: NodeJS.ErrnoException) => {
        if (err instanceof MvmError) reject(err);
        else reject(Object.assign(new MvmError(`lost the connection to mvmd: ${err.message}`), { code: err.code }));
      });
      req.end(payload);
    });
  }

  /** `GET /status`, or null when nothing answers (no daemon yet). */
  async ping(): Promise<Record<string, unknown> | null> {
    try {
      const res = await this.raw("GET", route("status"), { timeout: 5 });
      const body = await readBody(res, MAX_LINE);
      if (res.statusCode !== 200) return null;
      return JSON.parse(body.toString("utf8")) as Record<string, unknown>;
    } catch {
      return null;
    }
  }

  /** Start mvmd if it is not running (local socket only), bounded. */
  async ensureDaemon(): Promise<void> {
    if (this.ensured) return;
    if (this.remote) {
      this.ensured = true;
      return;
    }
    if (!this.starting) {
      this.starting = (async () => {
        if ((await this.ping()) !== null) return;
        if (!this.autostart) {
          throw new MvmError("mvmd is not running", { hint: "start it with `mvmctl daemon start`" });
        }
        await startDaemon();
        const deadline = Date.now() + DAEMON_START_TIMEOUT * 1000;
        while ((await this.ping()) === null) {
          if (Date.now() > deadline) {
            throw new MvmError(`mvmd did not start within ${DAEMON_START_TIMEOUT}s`, {
              hint: `see ${path.join(mvmHome(), "mvmd.log")}`,
            });
          }
          await new Promise((r) => setTimeout(r, 100));
        }
      })();
    }
    try {
      await this.starting;
      this.ensured = true;
    } finally {
      this.starting = null;
    }
  }

  /** One request; an error status becomes the typed error of its body. */
  async request(method: string, urlPath: string, opts: RequestOptions = {}): Promise<Response> {
    await this.ensureDaemon();
    const res = await this.raw(method, urlPath, opts);
    const body = await readBody(res, MAX_RESPONSE);
    const status = res.statusCode ?? 0;
    if (status >= 400) throw bodyError(status, body);
    return { status, body };
  }

  async json<T>(method: string, urlPath: string, opts: RequestOptions = {}): Promise<T> {
    const res = await this.request(method, urlPath, opts);
    try {
      return JSON.parse(res.body.toString("utf8")) as T;
    } catch {
      throw new MvmError(`mvmd answered ${method} ${urlPath} with something that is not JSON`);
    }
  }

  /**
   * An NDJSON stream: each line parsed. Breaking out of the loop closes the connection
   * (that is how a followed log stops).
   */
  async *lines(method: string, urlPath: string, opts: RequestOptions = {}): AsyncGenerator<unknown> {
    await this.ensureDaemon();
    const res = await this.raw(method, urlPath, opts);
    const status = res.statusCode ?? 0;
    if (status >= 400) throw bodyError(status, await readBody(res, MAX_LINE));
    let pending: Buffer = Buffer.alloc(0);
    try {
      for await (const chunk of res as AsyncIterable<Buffer>) {
        pending = pending.length ? Buffer.concat([pending, chunk]) : chunk;
        let nl: number;
        while ((nl = pending.indexOf(0x0a)) >= 0) {
          const line = pending.subarray(0, nl);
          pending = pending.subarray(nl + 1);
          if (line.length) yield parseLine(line);
        }
        if (pending.length > MAX_LINE) throw new MvmError(`mvmd sent a stream line over ${MAX_LINE} bytes`);
      }
      if (pending.length) yield parseLine(pending);
    } catch (err) {
      if (err instanceof MvmError) throw err;
      throw new MvmError(`lost the connection to mvmd: ${(err as Error).message}`);
    } finally {
      res.destroy();
    }
  }
}

function parseLine(line: Buffer): unknown {
  try {
    return JSON.parse(line.toString("utf8"));
  } catch {
    throw new MvmError("mvmd sent a stream line that is not JSON");
  }
}

function bodyError(status: number, body: Buffer): MvmError {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body.toString("utf8"));
  } catch {
    parsed = undefined;
  }
  if (isErrorBody(parsed)) return errorFromBody(parsed);
  return new MvmError(`mvmd answered HTTP ${status}: ${body.toString("utf8").slice(0, 500)}`);
}

function readBody(res: http.IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let size = 0;
    res.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        res.destroy(new MvmError(`mvmd's answer is larger than ${limit} bytes`));
        return;
      }
      parts.push(chunk);
    });
    res.on("end", () => resolve(Buffer.concat(parts)));
    res.on("error", (err) =>
      reject(err instanceof MvmError ? err : new MvmError(`lost the connection to mvmd: ${err.message}`)),
    );
  });
}

/** Refuse a daemon socket that belongs to another user (it could be anyone's daemon). */
export function checkSocketOwner(sock: string): void {
  let st: fs.Stats;
  try {
    st = fs.statSync(sock);
  } catch {
    return;
  }
  const uid = typeof process.geteuid === "function" ? process.geteuid() : st.uid;
  if (st.uid !== uid) {
    throw new HostError(`the mvmd socket ${sock} belongs to uid ${st.uid}, not to you`, {
      hint: "use your own MVM_HOME, or ask its owner",
      data: { socket: sock },
    });
  }
}

/**
 * Start mvmd through `mvmctl daemon start` (`MVM_MVMCTL`, else `mvmctl` on PATH): the
 * daemon is Python, and the CLI knows how to start it detached and wait for it.
 */
function startDaemon(): Promise<void> {
  const mvmctl = process.env.MVM_MVMCTL || "mvmctl";
  return new Promise((resolve, reject) => {
    const child = spawn(mvmctl, ["daemon", "start"], { stdio: ["ignore", "ignore", "pipe"], env: process.env });
    let err = "";
    child.stderr.on("data", (d: Buffer) => {
      if (err.length < 4096) err += d.toString("utf8");
    });
    const timer = setTimeout(() => child.kill("SIGKILL"), DAEMON_START_TIMEOUT * 1000);
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(
        new HostError(`cannot start mvmd: ${mvmctl}: ${e.message}`, {
          hint: "install mvm (./install.sh puts mvmctl on PATH), or set MVM_MVMCTL",
        }),
      );
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(new MvmError(`\`${mvmctl} daemon start\` failed (${code}): ${err.trim().slice(0, 500)}`));
    });
  });
}
