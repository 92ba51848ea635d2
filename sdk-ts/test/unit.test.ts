/**
 * The pure parts, without a VM: option validation, durations, names, the error classes
 * against Python's hierarchy, and record mode (placeholders, blobs, the IR).
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  CommandTimeout,
  ERRORS,
  InvalidArgument,
  MvmError,
  PolicyDenied,
  Recorder,
  Sandbox,
  SandboxNotFound,
  checkName,
  errorFromBody,
  isPlaceholder,
  network,
  parseDuration,
  resources,
  secret,
  setBackend,
} from "../src/index.js";
import { PYTHON, SDK_DIR, test } from "./helpers.js";

test("durations parse as in Python", () => {
  assert.equal(parseDuration("90s"), 90);
  assert.equal(parseDuration("1h30m"), 5400);
  assert.equal(parseDuration(" 30M "), 1800);
  assert.equal(parseDuration(2.5), 2.5);
  assert.equal(parseDuration("250ms"), 0.25);
  for (const bad of ["soon", "", "-1s", "1x", 0, -3, Infinity, "1h 30m"]) {
    assert.throws(() => parseDuration(bad as string), InvalidArgument, String(bad));
  }
});

test("resources, network and secrets are checked where they are made", () => {
  assert.deepEqual({ ...resources({ cpuCores: 2, memoryMb: 1024, rootfsSizeMb: 256 }) }, {
    cpuCores: 2,
    memoryMb: 1024,
    rootfsSizeMb: 256,
  });
  assert.throws(() => resources({ cpuCores: 0 }), InvalidArgument);
  assert.throws(() => resources({ memoryMb: 64 }), /memoryMb must be an integer from 128/);
  assert.throws(() => resources({ cpuCores: 1.5 }), InvalidArgument);
  assert.deepEqual(network().spec(), { preset: "none", allow: [] });
  assert.deepEqual(network({ mode: "allow", allow: ["pypi.org:443"] }).spec(), { preset: "none", allow: ["pypi.org:443"] });
  assert.throws(() => network({ mode: "allow" }), InvalidArgument);
  assert.throws(() => network({ mode: "deny", allow: ["x"] }), InvalidArgument);
  assert.throws(() => network({ mode: "allow", allow: ["a b"] }), InvalidArgument);
  assert.equal(String(secret("api-key")), 'mvm.secret("api-key")');
  assert.throws(() => secret("../etc"), InvalidArgument);
  assert.throws(() => checkName("sandbox", "Upper"), InvalidArgument);
  assert.throws(() => checkName("sandbox", "a/../b"), InvalidArgument);
  assert.equal(checkName("snapshot", "after-index"), "after-index");
});

test("error bodies become the typed class; unknown names stay MvmError", () => {
  const e = errorFromBody({ error: "SandboxNotFound", message: "no sandbox 'x'", hint: "see ls", data: { sandbox: "x" } });
  assert.ok(e instanceof SandboxNotFound && e instanceof MvmError && e instanceof Error);
  assert.deepEqual([e.message, e.hint, e.data, e.name], ["no sandbox 'x'", "see ls", { sandbox: "x" }, "SandboxNotFound"]);
  const u = errorFromBody({ error: "SomethingNew", message: "m" });
  assert.equal(u.constructor, MvmError);
  assert.equal(u.errorName, "SomethingNew");
  assert.equal(errorFromBody({ error: "constructor", message: "m" }).constructor, MvmError);
  assert.equal(new CommandTimeout("t").exitCode, 124);
  assert.equal(new PolicyDenied("p").exitCode, 125);
});

test("every error class of mvm.errors has a twin here with the same parent", () => {
  const code = [
    "import json, mvm.errors as e",
    "out = {n: c.__mro__[1].__name__ for n, c in vars(e).items()",
    "       if isinstance(c, type) and issubclass(c, e.MvmError)}",
    "print(json.dumps(out))",
  ].join("\n");
  const r = spawnSync(PYTHON, ["-c", code], { encoding: "utf8", timeout: 60_000 });
  assert.equal(r.status, 0, r.stderr);
  const py = JSON.parse(r.stdout) as Record<string, string>;
  const ts: Record<string, string> = {};
  for (const [name, cls] of Object.entries(ERRORS)) ts[name] = Object.getPrototypeOf(cls).name;
  py.MvmError = "Error";
  // every Python error has its twin; the TS side may already know names mvmd will send
  const missing = Object.keys(py).filter((n) => ts[n] !== py[n]);
  assert.deepEqual(missing, [], `add these to sdk-ts/src/errors.ts (same parent as in mvm.errors)`);
});

test("record mode: placeholders, blobs by hash, secret names only, the IR written on save", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mvts-rec-"));
  const rec = new Recorder(dir, "x.ts");
  setBackend(rec);
  try {
    const sb = await Sandbox.create("python-3.11", { env: { A: "1", K: secret("api-key") } });
    assert.ok(sb.recording);
    await sb.files.write("/work/f", "data");
    const r = await sb.commands.run(["echo", "hi"], { env: { S: secret("other") } });
    assert.ok(r.placeholder && isPlaceholder(r.stdout) && r.exitCode === 0);
    assert.ok(isPlaceholder(await sb.files.read("/work/f")));
    assert.ok(!isPlaceholder("real output") && !isPlaceholder(Buffer.from("x")));
    assert.deepEqual(await sb.files.list("/work"), []);
    assert.ok(await sb.files.exists("/nothing"));
    await assert.rejects(sb.ports.forward({ guestPort: 80, host: "::" }), PolicyDenied);
    {
      using _scoped = sb; // a sync `using` records the stop at once
    }
    const ir = JSON.parse(fs.readFileSync(rec.save(), "utf8"));
    assert.deepEqual(
      ir.operations.map((o: { op: string }) => o.op),
      ["sandbox.create", "files.write", "commands.run", "files.read", "files.list", "files.stat", "sandbox.stop"],
    );
    assert.deepEqual(ir.sandboxes[0].secret_env, { K: "api-key" });
    assert.deepEqual(ir.operations[2].args.secret_env, { S: "other" });
    const blob = ir.operations[1].args.data;
    assert.equal(fs.readFileSync(path.join(dir, "files", blob.sha256), "utf8"), "data");
  } finally {
    setBackend(null);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("invalid arguments fail at the call, before any backend", async () => {
  await assert.rejects(Sandbox.create("Bad Image"), InvalidArgument);
  await assert.rejects(Sandbox.create("python-3.11", { name: "UPPER" }), InvalidArgument);
  await assert.rejects(Sandbox.create("python-3.11", { ttl: "8d" }), /ttl is at most/);
  await assert.rejects(Sandbox.create("python-3.11", { include: ["/etc"] }), /absolute/);
  await assert.rejects(Sandbox.create("python-3.11", { include: ["../x"] }), /'\.\.'/);
  await assert.rejects(Sandbox.create("python-3.11", { env: { "1BAD": "x" } }), InvalidArgument);
});

test("the package's runtime imports are Node's own, its modules, and tsx (the runner's loader)", () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(SDK_DIR, "package.json"), "utf8")) as {
    dependencies?: Record<string, string>;
    type?: string;
  };
  assert.equal(pkg.type, "module");
  // tsx is what TypeScript scripts run through (Node 20 cannot strip types itself), so it
  // is a dependency: `./runner` works where the package is installed without dev tools
  assert.deepEqual(Object.keys(pkg.dependencies ?? {}), ["tsx"]);
  const srcDir = path.join(SDK_DIR, "src");
  const found = new Set<string>();
  for (const f of fs.readdirSync(srcDir).filter((n) => n.endsWith(".ts"))) {
    const text = fs.readFileSync(path.join(srcDir, f), "utf8").replace(/\/\*[\s\S]*?\*\//g, "");
    for (const m of text.matchAll(/(?:from|import)\s*\(?\s*"([^"]+)"/g)) found.add(m[1]!);
  }
  const outside = [...found].filter((s) => !s.startsWith("node:") && !s.startsWith("./"));
  assert.deepEqual(outside, ["tsx/esm/api"]);
});
