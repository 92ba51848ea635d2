/**
 * The mvm TypeScript SDK: `Sandbox` and the values `create` takes, the same surface and
 * the same record / plan / live modes as the Python SDK (`import mvm`).
 *
 *     import { Sandbox, secret } from "@mvm/sdk";
 *     await using sandbox = await Sandbox.create("python-3.11", { ttl: "30m" });
 */
import "./polyfill.js";

export { CommandResult, isPlaceholder } from "./backend.js";
export type { Backend } from "./backend.js";
export { CommandHandle, Commands } from "./commands.js";
export type { Argv, Data, RunOptions, StartOptions } from "./commands.js";
export { parseDuration } from "./durations.js";
export type { Duration } from "./durations.js";
export * from "./errors.js";
export * as errors from "./errors.js";
export { Files } from "./files.js";
export { LiveBackend } from "./live.js";
export { currentMode, setBackend } from "./mode.js";
export type {
  FileEntry,
  FileStat,
  ForwardInfo,
  LogEvent,
  NetworkSpec,
  ProcView,
  SandboxInfo,
  SnapshotInfo,
} from "./models.js";
export { Network, Resources, SecretRef, checkName, network, resources, secret } from "./options.js";
export type { Env, EnvValue, NetworkOptions, ResourcesOptions } from "./options.js";
export { Forward, Ports } from "./ports.js";
export type { ForwardOptions } from "./ports.js";
export { Recorder } from "./record.js";
export { Sandbox } from "./sandbox.js";
export type { CreateOptions, LogsOptions, Snapshot } from "./sandbox.js";
export { ACTOR_ENV, Transport, checkActor } from "./transport.js";
export { SDK_VERSION } from "./version.js";
