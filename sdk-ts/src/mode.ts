/**
 * Which backend a process uses: live (the default) or record, chosen by the environment
 * as in Python: `MVM_SDK_MODE=record` with `MVM_SDK_RECORD_DIR=DIR` (set by `mvmctl
 * compile` and `mvmctl run --mode plan`) records into DIR. The recording is saved when
 * the runner finishes, or when the process exits, whatever the reason.
 */
import type { Backend } from "./backend.js";
import { InvalidArgument } from "./errors.js";
import { LiveBackend } from "./live.js";
import { Recorder } from "./record.js";

export const MODE_ENV = "MVM_SDK_MODE";
export const RECORD_DIR_ENV = "MVM_SDK_RECORD_DIR";
export const MODES = ["live", "record"] as const;

let current: Backend | null = null;

export function currentMode(): "live" | "record" {
  const mode = process.env[MODE_ENV] || "live";
  if (mode !== "live" && mode !== "record") {
    throw new InvalidArgument(`${MODE_ENV}=${JSON.stringify(mode)} is not one of ${MODES.join(", ")}`, {
      hint: "plan mode is `mvmctl run --mode plan SCRIPT`; it records the script",
    });
  }
  return mode;
}

/** The process-wide backend (made on first use). */
export function backend(): Backend {
  if (current === null) {
    if (currentMode() === "record") {
      const out = process.env[RECORD_DIR_ENV];
      if (!out) throw new InvalidArgument(`${MODE_ENV}=record needs ${RECORD_DIR_ENV}=DIR`);
      const rec = new Recorder(out, process.argv[1] ?? null);
      process.on("exit", () => {
        if (!rec.saved) rec.save();
      });
      current = rec;
    } else {
      current = new LiveBackend();
    }
  }
  return current;
}

/** The recorder, if this process records and has made one. */
export function recorder(): Recorder | null {
  return current instanceof Recorder ? current : null;
}

/** Use `b` as the process-wide backend (tests; a program that wants its own transport). */
export function setBackend(b: Backend | null): void {
  current = b;
}
