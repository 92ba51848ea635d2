/**
 * Cleanup: `await using` stops the sandbox when its scope ends with an exception, and a
 * script killed mid-run (SIGKILL: no cleanup can run) leaves nothing past the TTL.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { Sandbox, SandboxNotFound } from "../src/index.js";
import { IMAGE, SDK_DIR, runScript, sandboxNames, startScript, test, waitUntil } from "./helpers.js";

test("await using stops the sandbox when the block throws", async () => {
  let name = "";
  await assert.rejects(
    (async () => {
      await using sb = await Sandbox.create(IMAGE, { ttl: "10m" });
      name = sb.name;
      assert.equal((await sb.commands.run(["echo", "in the block"])).stdout, "in the block\n");
      assert.ok(sandboxNames().includes(name));
      throw new Error("boom in the block");
    })(),
    /boom in the block/,
  );
  assert.ok(name);
  assert.ok(!sandboxNames().includes(name), "the sandbox is gone once the block has thrown");
  await assert.rejects(Sandbox.connect(name), SandboxNotFound);
});

test("a sync `using` (Symbol.dispose, the cookbook's form) stops the sandbox when the script throws", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mvts-using-"));
  try {
    const script = path.join(dir, "using.ts");
    fs.writeFileSync(
      script,
      [
        'import { Sandbox } from "@mvm/sdk";',
        "{",
        '  using sandbox = await Sandbox.create("python-3.11", { ttl: "10m" });',
        "  console.log(`created ${sandbox.name}`);",
        '  await sandbox.files.write("/work/x", "x");',
        '  throw new Error("boom after create");',
        "}",
      ].join("\n"),
    );
    const r = runScript(script);
    assert.equal(r.code, 1, r.stdout + r.stderr);
    assert.ok(r.stderr.includes("boom after create"), r.stderr);
    const name = /created (\S+)/.exec(r.stdout)?.[1];
    assert.ok(name, r.stdout);
    assert.ok(!sandboxNames().includes(name), "the runner waited for the stop `using` started");
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("a script killed mid-run leaves no sandbox past its TTL", async () => {
  const child = startScript(path.join(SDK_DIR, "test", "fixtures", "killme.ts"));
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  try {
    assert.ok(await waitUntil(() => /created (\S+)/.test(out) || child.exitCode !== null, 240), "no sandbox made");
    const name = /created (\S+)/.exec(out)?.[1];
    assert.ok(name, `the script did not create its sandbox: ${out}\n${err}`);
    child.kill("SIGKILL");
    assert.ok(await waitUntil(() => child.exitCode !== null || child.signalCode !== null, 30));
    const ttlLeft = Number(/ttl_left (\d+)/.exec(out)?.[1] ?? 0);
    if (ttlLeft > 15) {
      // (on a slow host the boot may eat most of the TTL before the script hears back)
      assert.ok(sandboxNames().includes(name), "the sandbox outlives the killed script (until its TTL)");
    }
    // TTL 45 s from create; the reaper runs every second: bounded generously (slow TCG host)
    assert.ok(await waitUntil(() => !sandboxNames().includes(name), 180, 2), `${name} is still there past its TTL`);
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
});
