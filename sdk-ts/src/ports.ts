/**
 * `sandbox.ports`: TCP forwards from a host port to a guest port. They bind 127.0.0.1
 * unless told otherwise; a wildcard address (0.0.0.0, ::) needs `allowWildcard: true`.
 */
import { isIP } from "node:net";
import "./polyfill.js";
import type { Target } from "./commands.js";
import { InvalidArgument, PolicyDenied } from "./errors.js";
import type { ForwardInfo, PortSpec } from "./models.js";

export function isWildcard(host: string): boolean {
  if (host === "" || host === "*") return true;
  const h = host.replace(/^\[|\]$/g, "");
  if (isIP(h) === 4) return h === "0.0.0.0";
  if (isIP(h) === 6) return /^[0:]+$/.test(h);
  return false;
}

export interface ForwardOptions {
  guestPort: number;
  /** 0 (the default): any free port. */
  hostPort?: number;
  host?: string;
  allowWildcard?: boolean;
}

export function checkSpec(opts: ForwardOptions): PortSpec {
  const guestPort = opts.guestPort;
  const hostPort = opts.hostPort ?? 0;
  const host = opts.host ?? "127.0.0.1";
  const allowWildcard = opts.allowWildcard === true;
  for (const [what, port, lo] of [
    ["guestPort", guestPort, 1],
    ["hostPort", hostPort, 0],
  ] as const) {
    if (!Number.isInteger(port) || port < lo || port > 65535) {
      throw new InvalidArgument(`${what} must be ${lo}..65535, not ${String(port)}`);
    }
  }
  if (typeof host !== "string" || host.length > 255) throw new InvalidArgument(`invalid host ${JSON.stringify(host)}`);
  if (isWildcard(host) && !allowWildcard) {
    throw new PolicyDenied(`forwarding on the wildcard address '${host}' exposes the guest to the network`, {
      hint: "bind 127.0.0.1 (the default), or pass allowWildcard: true if you mean it",
      data: { host },
    });
  }
  return { guestPort, hostPort, host, allowWildcard };
}

/** One live forward; `close()` removes it (also `await using`). */
export class Forward {
  readonly id: string;
  readonly host: string;
  readonly hostPort: number;
  readonly guestPort: number;
  readonly auditId: string | null;

  constructor(
    private readonly sb: Target,
    info: ForwardInfo,
  ) {
    this.id = info.id;
    this.host = info.host;
    this.hostPort = info.hostPort;
    this.guestPort = info.guestPort;
    this.auditId = info.auditId;
  }

  async close(): Promise<void> {
    await this.sb.backend.unforward(this.sb.key, this.id);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

export class Ports {
  constructor(private readonly sb: Target) {}

  /** Forward `host:hostPort` (0: any free port) to the guest's `guestPort`. */
  async forward(opts: ForwardOptions | number, more: Omit<ForwardOptions, "guestPort"> = {}): Promise<Forward> {
    const spec = checkSpec(typeof opts === "number" ? { ...more, guestPort: opts } : opts);
    return new Forward(this.sb, await this.sb.backend.forward(this.sb.key, spec));
  }
}
