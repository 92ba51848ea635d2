/**
 * `node runner.js SCRIPT [ARGS...]`: run an SDK script the way `mvmctl` does (the Python
 * side's `python -m mvm.sdk.runner`). TypeScript runs through tsx's loader, installed
 * with the package; `@mvm/sdk` resolves to this package. The mode comes from the
 * environment (`MVM_SDK_MODE`). An `MvmError` the script does not catch is printed as
 * `mvm: message` + `hint:` (no stack) and exits with the error's code; in record mode the
 * recording is saved whatever happens.
 */
import { register } from "node:module";
import * as path from "node:path";
import { pathToFileURL } from "node:url";
import { MvmError } from "./errors.js";
import * as mode from "./mode.js";
import { settleDisposals } from "./sandbox.js";

const TS = /\.(ts|mts|cts|tsx)$/;

async function main(argv: string[]): Promise<number> {
  const script = argv[0];
  if (!script) {
    process.stderr.write("usage: node runner.js SCRIPT [ARGS...]\n");
    return 2;
  }
  if (TS.test(script)) {
    const tsx = (await import("tsx/esm/api")) as { register: () => unknown };
    tsx.register();
  }
  register(new URL("./hooks.js", import.meta.url), {
    data: { sdk: new URL("./index.js", import.meta.url).href },
  });
  process.argv = [process.argv[0]!, script, ...argv.slice(1)];
  let code = 0;
  try {
    if (mode.currentMode() === "record") mode.backend(); // an empty recording is still one
    await import(pathToFileURL(path.resolve(script)).href);
    await settleDisposals();
  } catch (err) {
    await settleDisposals();
    if (err instanceof MvmError) {
      process.stderr.write(`mvm: ${err.message}\n`);
      if (err.hint) process.stderr.write(`hint: ${err.hint}\n`);
      code = err.exitCode;
    } else {
      process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      code = 1;
    }
  } finally {
    mode.recorder()?.save();
  }
  return code;
}

main(process.argv.slice(2)).then(
  (code) => {
    if (code !== 0 || !process.exitCode) process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`mvm runner: ${String(err)}\n`);
    process.exitCode = 1;
  },
);
