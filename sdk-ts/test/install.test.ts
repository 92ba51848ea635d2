/**
 * install.sh's TypeScript SDK block, run as written on a copy of the package with a PATH
 * that has no Node: it asks apt-get for Debian's `nodejs` and `npm` (apt-get here is a
 * script that records its arguments and then puts the host's node/npm/npx on that PATH,
 * as the real package would), then `npm ci` and `tsc` build `dist/src/index.js`.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { ROOT, SDK_DIR, test } from "./helpers.js";

/** The lines of install.sh from the TypeScript SDK block's header to its end marker. */
function tsBlock(): string {
  const text = fs.readFileSync(path.join(ROOT, "install.sh"), "utf8");
  const start = text.indexOf("# --- TypeScript SDK");
  const end = text.indexOf("# --- end of the TypeScript SDK block");
  assert.ok(start >= 0 && end > start, "install.sh has its TypeScript SDK block");
  return text.slice(start, end);
}

/** Absolute path of a host tool (from the test's own PATH). */
function which(tool: string): string {
  const r = spawnSync("sh", ["-c", `command -v ${tool}`], { encoding: "utf8" });
  assert.equal(r.status, 0, `${tool} not found`);
  return fs.realpathSync(r.stdout.trim());
}

test("install.sh installs nodejs/npm when node is missing, then builds the package", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mvts-install-"));
  try {
    const root = path.join(dir, "repo");
    const sdk = path.join(root, "sdk-ts");
    fs.mkdirSync(sdk, { recursive: true });
    for (const f of ["package.json", "package-lock.json", "tsconfig.json", "src", "test"]) {
      fs.cpSync(path.join(SDK_DIR, f), path.join(sdk, f), { recursive: true });
    }
    const bin = path.join(dir, "bin");
    fs.mkdirSync(bin);
    for (const tool of ["sh", "bash", "env", "rm", "cat", "dirname", "uname", "mkdir", "cp", "ln", "chmod"]) {
      fs.symlinkSync(which(tool), path.join(bin, tool));
    }
    const node = process.execPath;
    const log = path.join(dir, "apt.log");
    fs.writeFileSync(
      path.join(bin, "apt-get"),
      [
        "#!/bin/sh",
        `echo "$*" >> ${JSON.stringify(log)}`,
        `ln -sf ${JSON.stringify(node)} ${JSON.stringify(path.join(bin, "node"))}`,
        `ln -sf ${JSON.stringify(which("npm"))} ${JSON.stringify(path.join(bin, "npm"))}`,
        `ln -sf ${JSON.stringify(which("npx"))} ${JSON.stringify(path.join(bin, "npx"))}`,
        "",
      ].join("\n"),
      { mode: 0o755 },
    );
    const r = spawnSync(which("bash"), ["-euo", "pipefail", "-c", tsBlock()], {
      cwd: root,
      encoding: "utf8",
      timeout: 600_000,
      env: { PATH: bin, HOME: process.env.HOME ?? dir },
    });
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const apt = fs.readFileSync(log, "utf8");
    assert.match(apt, /^install -y -q --no-install-recommends nodejs npm$/m);
    assert.ok(fs.existsSync(path.join(sdk, "dist", "src", "index.js")), "built");
    assert.ok(fs.existsSync(path.join(sdk, "dist", "src", "runner.js")), "built");
    assert.ok(fs.existsSync(path.join(sdk, "node_modules", "tsx")), "the loader is installed with the package");
    // safe to re-run: node is there now, apt-get is not asked again
    const again = spawnSync(which("bash"), ["-euo", "pipefail", "-c", tsBlock()], {
      cwd: root,
      encoding: "utf8",
      timeout: 600_000,
      env: { PATH: bin, HOME: process.env.HOME ?? dir },
    });
    assert.equal(again.status, 0, again.stdout + again.stderr);
    assert.equal(fs.readFileSync(log, "utf8"), apt);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
