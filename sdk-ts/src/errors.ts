/**
 * One error hierarchy, mirroring `mvm.errors` in Python (same class names, `message`,
 * `hint`, `data`, `exitCode`), so a program catches the same thing in both languages.
 * mvmd sends errors as `{"error", "message", "hint", "data"}`; `errorFromBody` turns the
 * name back into its class (unknown names become a plain `MvmError` keeping `errorName`).
 */

export type ErrorData = Record<string, unknown>;

export class MvmError extends Error {
  /** Exit status the CLI (and the script runner) uses for this error. */
  static exitCode = 125;
  readonly hint: string | null;
  readonly data: ErrorData;
  /** The error's name as mvmd sent it (equal to `name` for a known class). */
  errorName: string;

  constructor(message: string, options: { hint?: string | null; data?: ErrorData } = {}) {
    super(message);
    this.name = new.target.name;
    this.errorName = new.target.name;
    this.hint = options.hint ?? null;
    this.data = options.data ?? {};
  }

  get exitCode(): number {
    return (this.constructor as typeof MvmError).exitCode;
  }

  toJSON(): Record<string, unknown> {
    return { error: this.errorName, message: this.message, hint: this.hint, data: this.data };
  }
}

export class HostError extends MvmError {}
export class QemuNotFound extends HostError {}
export class ImageError extends MvmError {}
export class ImageNotFound extends ImageError {}
export class UnknownPreset extends ImageError {}
export class ManifestError extends ImageError {}
export class ImageBuildError extends ImageError {}
export class VMError extends MvmError {}
export class VMBootTimeout extends VMError {}
export class VMDied extends VMError {}
export class AgentError extends MvmError {}
export class AgentProtocolError extends VMError {}
export class CommandTimeout extends MvmError {
  static override exitCode = 124;
  /** The result so far, when a command ran past its timeout. */
  result?: unknown;
}
export class CommandFailed extends MvmError {
  static override exitCode = 1;
  /** The command's result (exit code, output). */
  result?: unknown;
}
export class InvalidArgument extends MvmError {
  static override exitCode = 2;
}
export class SandboxNotFound extends MvmError {}
export class SandboxExists extends MvmError {}
export class SandboxStateError extends MvmError {}
/** A state change the sandbox state machine does not allow. */
export class InvalidTransition extends SandboxStateError {}
/** mvmd could not load a sandbox's saved state. */
export class StateLoadError extends VMError {}
/** The audit log could not be written or verified. */
export class AuditError extends MvmError {}
export class SnapshotNotFound extends MvmError {}
export class SnapshotExists extends MvmError {}
export class ForwardNotFound extends MvmError {}
export class PolicyDenied extends MvmError {}
export class PolicyFileError extends MvmError {
  static override exitCode = 2;
}
export class SecretError extends MvmError {}
export class SecretNotFound extends SecretError {}

/** Every class by name: what `errorFromBody` looks names up in. */
export const ERRORS: Readonly<Record<string, typeof MvmError>> = Object.freeze({
  MvmError,
  HostError,
  QemuNotFound,
  ImageError,
  ImageNotFound,
  UnknownPreset,
  ManifestError,
  ImageBuildError,
  VMError,
  VMBootTimeout,
  VMDied,
  AgentError,
  AgentProtocolError,
  CommandTimeout,
  CommandFailed,
  InvalidArgument,
  SandboxNotFound,
  SandboxExists,
  SandboxStateError,
  InvalidTransition,
  StateLoadError,
  AuditError,
  SnapshotNotFound,
  SnapshotExists,
  ForwardNotFound,
  PolicyDenied,
  PolicyFileError,
  SecretError,
  SecretNotFound,
});

/** An error body as mvmd sends it. */
export interface ErrorBody {
  error: string;
  message: string;
  hint?: string | null;
  data?: ErrorData;
}

export function isErrorBody(v: unknown): v is ErrorBody {
  if (typeof v !== "object" || v === null) return false;
  const b = v as Record<string, unknown>;
  return typeof b.error === "string" && typeof b.message === "string";
}

/** The typed error for a body from mvmd (bounded: the daemon is trusted, but not its guests' text). */
export function errorFromBody(body: ErrorBody): MvmError {
  const cls = Object.prototype.hasOwnProperty.call(ERRORS, body.error) ? ERRORS[body.error]! : MvmError;
  const data = typeof body.data === "object" && body.data !== null ? body.data : {};
  const err = new cls(String(body.message).slice(0, 64 * 1024), {
    hint: typeof body.hint === "string" ? body.hint : null,
    data,
  });
  err.errorName = body.error.slice(0, 200);
  return err;
}
