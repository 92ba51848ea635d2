/**
 * What a script passes to `Sandbox.create` and to commands: resources, network, secret
 * references, names. Pure values validated where they are made (as `mvm/sdk/options.py`
 * and `mvm/names.py` do), so a bad value fails at the line that wrote it.
 */
import { InvalidArgument } from "./errors.js";

/** Lower-case names (sandboxes, snapshots, images) and mixed-case ones (secrets): names.py. */
export const LOWER_RE = /^[a-z0-9][a-z0-9._-]{0,62}$/;
export const MIXED_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
export const FORWARD_RE = /^fw-[0-9a-f]{8}$/;
export const LABEL_RE = /^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$/;
export const ENV_NAME_RE = /^[A-Za-z_][A-Za-z0-9_]{0,127}$/;

const RULES = {
  sandbox: [LOWER_RE, "lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)"],
  snapshot: [LOWER_RE, "lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)"],
  image: [LOWER_RE, "lower-case letters, digits, '.', '_' and '-' (max 63, starting with a letter or digit)"],
  secret: [MIXED_RE, "letters, digits, '.', '_' and '-' (max 64, starting with a letter or digit)"],
  forward: [FORWARD_RE, "an id as printed by `mvmctl forward --list` (fw- and 8 hex digits)"],
} as const;

export type NameKind = keyof typeof RULES;

/** `name` if it follows the rule of `kind` (the same rule as mvm.names), else InvalidArgument. */
export function checkName(kind: NameKind, name: unknown): string {
  const [re, rule] = RULES[kind];
  if (typeof name === "string" && re.test(name)) return name;
  const shown = JSON.stringify(name)?.slice(0, 80) ?? String(name);
  throw new InvalidArgument(`invalid ${kind} name ${shown}`, { hint: `use ${rule}`, data: { kind } });
}

export const MAX_CPUS = 16;
export const MIN_MEMORY_MB = 128;
export const MAX_MEMORY_MB = 16384;
export const MIN_ROOTFS_MB = 16;
export const MAX_ROOTFS_MB = 65536;
export const MAX_ALLOW = 256;
export const PRESETS = ["none", "registries", "dev", "unrestricted"] as const;
export type Preset = (typeof PRESETS)[number];

function intIn(what: string, value: unknown, lo: number, hi: number): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < lo || value > hi) {
    throw new InvalidArgument(`${what} must be an integer from ${lo} to ${hi}, not ${String(value)}`, {
      data: { field: what },
    });
  }
  return value;
}

/** CPU cores, memory, and the size of the writable layer (`rootfsSizeMb`). */
export class Resources {
  constructor(
    readonly cpuCores: number = 1,
    readonly memoryMb: number = 512,
    readonly rootfsSizeMb: number | null = null,
  ) {
    Object.freeze(this);
  }
}

export interface ResourcesOptions {
  cpuCores?: number;
  memoryMb?: number;
  rootfsSizeMb?: number | null;
}

/** Validated `Resources` (InvalidArgument names the bound that was crossed). */
export function resources(opts: ResourcesOptions = {}): Resources {
  const cpu = intIn("cpuCores", opts.cpuCores ?? 1, 1, MAX_CPUS);
  const mem = intIn("memoryMb", opts.memoryMb ?? 512, MIN_MEMORY_MB, MAX_MEMORY_MB);
  const disk =
    opts.rootfsSizeMb === undefined || opts.rootfsSizeMb === null
      ? null
      : intIn("rootfsSizeMb", opts.rootfsSizeMb, MIN_ROOTFS_MB, MAX_ROOTFS_MB);
  return new Resources(cpu, mem, disk);
}

/** What the sandbox may reach: `deny` (no NIC) or `allow` of `host[:port]` patterns. */
export class Network {
  constructor(
    readonly mode: "deny" | "allow" = "deny",
    readonly allow: readonly string[] = [],
    readonly preset: Preset = "none",
  ) {
    Object.freeze(this);
  }

  /** The wire form (`NetworkSpec`). */
  spec(): { preset: Preset; allow: string[] } {
    return { preset: this.preset, allow: [...this.allow] };
  }
}

export interface NetworkOptions {
  mode?: "deny" | "allow";
  allow?: readonly string[];
  preset?: Preset;
}

/** `network({ mode: "deny" })` (the default) or `network({ mode: "allow", allow: ["pypi.org:443"] })`. */
export function network(opts: NetworkOptions = {}): Network {
  const mode = opts.mode ?? "deny";
  const preset = opts.preset ?? "none";
  if (mode !== "deny" && mode !== "allow") {
    throw new InvalidArgument(`network mode ${JSON.stringify(mode)} is not one of deny, allow`, { data: { mode } });
  }
  if (!(PRESETS as readonly string[]).includes(preset)) {
    throw new InvalidArgument(`network preset ${JSON.stringify(preset)} is not one of ${PRESETS.join(", ")}`, {
      data: { preset },
    });
  }
  const allow = opts.allow ?? [];
  if (typeof allow === "string" || !Array.isArray(allow)) {
    throw new InvalidArgument("network allow takes a list of host[:port] patterns, not a string");
  }
  if (allow.length > MAX_ALLOW) {
    throw new InvalidArgument(`at most ${MAX_ALLOW} network allow entries`, { data: { count: allow.length } });
  }
  for (const e of allow) {
    if (typeof e !== "string" || e === "" || e.length > 255 || /\s/.test(e)) {
      throw new InvalidArgument(`invalid network allow entry ${JSON.stringify(e)}`, { hint: "use host[:port]" });
    }
  }
  if (mode === "deny" && (allow.length > 0 || preset !== "none")) {
    throw new InvalidArgument("network({ mode: 'deny' }) takes no allow list or preset", {
      hint: "use mode: 'allow' to open anything",
    });
  }
  if (mode === "allow" && allow.length === 0 && preset === "none") {
    throw new InvalidArgument("network({ mode: 'allow' }) needs an allow list or a preset", {
      hint: "e.g. network({ mode: 'allow', allow: ['pypi.org:443'] })",
    });
  }
  return new Network(mode, Object.freeze([...allow]), preset);
}

/**
 * A reference to a secret in the host's store, by name. It holds no value: mvmd resolves
 * it when the command starts, so the value never passes through the script.
 */
export class SecretRef {
  readonly name: string;
  constructor(name: string) {
    if (typeof name !== "string" || !MIXED_RE.test(name)) {
      throw new InvalidArgument(`invalid secret name ${JSON.stringify(name)}`, {
        hint: "letters, digits, '.', '_' and '-' (max 64), starting with a letter or digit",
      });
    }
    this.name = name;
    Object.freeze(this);
  }

  toString(): string {
    return `mvm.secret(${JSON.stringify(this.name)})`;
  }

  toJSON(): string {
    return this.toString();
  }
}

/** `secret("api-key")`: a reference resolved by the host, never a value. */
export function secret(name: string): SecretRef {
  return new SecretRef(name);
}

export type EnvValue = string | SecretRef;
export type Env = Record<string, EnvValue>;

/** [plain variables, {variable: secret name}] from an `env` mapping. */
export function splitEnv(env: Env | undefined | null): [Record<string, string>, Record<string, string>] {
  const plain: Record<string, string> = {};
  const secrets: Record<string, string> = {};
  if (env === undefined || env === null) return [plain, secrets];
  if (typeof env !== "object" || Array.isArray(env)) throw new InvalidArgument("env takes an object");
  for (const [k, v] of Object.entries(env)) {
    if (!ENV_NAME_RE.test(k)) throw new InvalidArgument(`invalid environment variable name ${JSON.stringify(k)}`);
    if (v instanceof SecretRef) {
      secrets[k] = v.name;
    } else if (typeof v === "string") {
      if (v.includes("\0")) throw new InvalidArgument(`environment variable ${k} contains a NUL byte`);
      plain[k] = v;
    } else {
      throw new InvalidArgument(`environment variable ${k} must be a string or secret(...), not ${typeof v}`);
    }
  }
  return [plain, secrets];
}
