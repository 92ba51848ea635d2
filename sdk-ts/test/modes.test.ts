/**
 * The three modes with TypeScript scripts: record mode's IR validates against
 * schemas/ir-v1.json, a TS script and its Python twin compile to the same IR, plan mode
 * runs admission on a TS script without a VM, and a compiled TS script replays live.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { after, before } from "node:test";
import { PYTHON, ROOT, SDK_DIR, SECRET_VALUE, docBlocks, mvmctl, runScript, sandboxNames, test } from "./helpers.js";

const FIXTURES = path.join(SDK_DIR, "test", "fixtures");
let dir = "";

before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "mvts-modes-"));
  fs.cpSync(path.join(FIXTURES, "src"), path.join(dir, "src"), { recursive: true });
});

after(() => fs.rmSync(dir, { recursive: true, force: true }));

function compile(script: string, out: string): Record<string, unknown> {
  const r = mvmctl(["compile", script, "--out", out], { cwd: path.dirname(script) });
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(fs.readFileSync(path.join(out, "ir.json"), "utf8")) as Record<string, unknown>;
}

/** Validate with the jsonschema package of the repo's Python (a dev dependency). */
function validate(irPath: string): void {
  const code = [
    "import json, sys, jsonschema",
    "schema = json.load(open(sys.argv[1]))",
    "jsonschema.validate(json.load(open(sys.argv[2])), schema)",
  ].join("\n");
  const r = spawnSync(PYTHON, ["-c", code, path.join(ROOT, "schemas", "ir-v1.json"), irPath], {
    encoding: "utf8",
    timeout: 60_000,
  });
  assert.equal(r.status, 0, `${irPath} does not validate:\n${r.stderr}`);
}

test("a TS script and its Python twin compile to the same IR, valid against the schema", () => {
  for (const f of ["twin.ts", "twin.py"]) fs.copyFileSync(path.join(FIXTURES, f), path.join(dir, f));
  const ts = compile(path.join(dir, "twin.ts"), path.join(dir, "ir-ts"));
  const py = compile(path.join(dir, "twin.py"), path.join(dir, "ir-py"));
  validate(path.join(dir, "ir-ts", "ir.json"));
  for (const ir of [ts, py]) {
    delete ir.script;
    delete ir.mvm_version;
  }
  assert.ok((ts.operations as unknown[]).length >= 25);
  // numbers compare by value (Python writes 300.0 where JSON from Node has 300)
  assert.deepEqual(ts, py);
  assert.deepEqual(fs.readdirSync(path.join(dir, "ir-ts", "files")).sort(), fs.readdirSync(path.join(dir, "ir-py", "files")).sort());
  assert.ok(!fs.readFileSync(path.join(dir, "ir-ts", "ir.json"), "utf8").includes(SECRET_VALUE));
});

test("record mode without mvmctl: the IR is saved even when the script fails", () => {
  const script = path.join(dir, "fails.mjs");
  fs.writeFileSync(
    script,
    [
      'import { Sandbox } from "@mvm/sdk";',
      'const sb = await Sandbox.create("python-3.11");',
      'await sb.files.write("/work/x", "x");',
      'throw new Error("the script broke");',
    ].join("\n"),
  );
  const out = path.join(dir, "rec-fails");
  const r = runScript(script, { MVM_SDK_MODE: "record", MVM_SDK_RECORD_DIR: out });
  assert.equal(r.code, 1);
  assert.ok(r.stderr.includes("the script broke"));
  const ir = JSON.parse(fs.readFileSync(path.join(out, "ir.json"), "utf8"));
  assert.deepEqual(ir.operations.map((o: { op: string }) => o.op), ["sandbox.create", "files.write"]);
  validate(path.join(out, "ir.json"));
});

test("the cookbook's TS example: plan (admission, no VM), compile, replay live", () => {
  const existing = sandboxNames().sort(); // what another file may have left is not this test's
  const script = path.join(dir, "cookbook.ts");
  fs.writeFileSync(script, docBlocks()[0]!);
  const plan = mvmctl(["run", "--mode", "plan", script], { cwd: dir });
  assert.equal(plan.code, 0, plan.stderr);
  assert.ok(plan.stdout.includes("admission  allow"), plan.stdout);
  assert.ok(plan.stdout.includes("secrets    api-key"), plan.stdout);
  assert.ok(plan.stdout.includes("workload   agent-tool"), plan.stdout);
  assert.ok(plan.stdout.includes("/work/src/tool.py"), plan.stdout);
  assert.deepEqual(sandboxNames().sort(), existing, "plan mode started nothing");
  const json = mvmctl(["run", "--mode", "plan", "--json", script], { cwd: dir });
  assert.equal(json.code, 0, json.stderr);
  assert.equal(JSON.parse(json.stdout).decisions[0].allowed, true);

  const out = path.join(dir, "cookbook-ir");
  const ir = compile(script, out);
  validate(path.join(out, "ir.json"));
  assert.deepEqual((ir.sandboxes as { image: string }[]).map((s) => s.image), ["python-3.11"]);
  const replay = mvmctl(["run", "--mode", "live", out], { cwd: dir });
  assert.equal(replay.code, 0, replay.stderr);
  assert.deepEqual(sandboxNames().sort(), existing, "the replay stopped its sandbox");

  const bad = path.join(dir, "cookbook-312.ts");
  fs.writeFileSync(bad, docBlocks()[0]!.replace("python-3.11", "python-3.12"));
  for (const args of [["run", "--mode", "plan", bad], ["compile", bad, "--out", path.join(dir, "bad")]]) {
    const r = mvmctl(args, { cwd: dir });
    assert.equal(r.code, 125, r.stderr);
    assert.ok(r.stderr.includes("unknown image 'python-3.12'") && r.stderr.includes("python-3.11"), r.stderr);
    assert.ok(!r.stderr.includes("    at "), "no stack trace");
  }
});

test("mvmctl detects JavaScript too: a .mjs and a .js script compile and plan like the .ts one", () => {
  const existing = sandboxNames().sort();
  const body = [
    'import { Sandbox, secret } from "@mvm/sdk";',
    'const sb = await Sandbox.create("python-3.11", { workloadId: "js-twin", ttl: "5m" });',
    'await sb.files.write("/work/a", "a");',
    'await sb.commands.run(["cat", "/work/a"], { env: { K: secret("api-key") } });',
    "await sb.kill();",
    "",
  ].join("\n");
  const irs: Record<string, unknown>[] = [];
  for (const ext of ["ts", "mjs", "js"]) {
    const script = path.join(dir, `js-twin.${ext}`);
    fs.writeFileSync(script, body);
    const ir = compile(script, path.join(dir, `ir-js-${ext}`));
    delete ir.script;
    irs.push(ir);
    const plan = mvmctl(["run", "--mode", "plan", script], { cwd: dir });
    assert.equal(plan.code, 0, plan.stderr);
    assert.ok(plan.stdout.includes("workload   js-twin") && plan.stdout.includes("admission  allow"), plan.stdout);
  }
  validate(path.join(dir, "ir-js-mjs", "ir.json"));
  assert.deepEqual(
    (irs[0]!.operations as { op: string }[]).map((o) => o.op),
    ["sandbox.create", "files.write", "commands.run", "sandbox.stop"],
  );
  assert.deepEqual(irs[1], irs[0]);
  assert.deepEqual(irs[2], irs[0]);
  assert.deepEqual(sandboxNames().sort(), existing, "compile and plan started nothing");
});

test("a denied plan exits 3 and names the rule", () => {
  const policy = path.join(dir, "policy.toml");
  fs.writeFileSync(policy, "max_memory_mb = 256\n");
  const script = path.join(dir, "big.ts");
  fs.writeFileSync(
    script,
    'import { Sandbox, resources } from "@mvm/sdk";\n' +
      'await using sb = await Sandbox.create("python-3.11", { resources: resources({ memoryMb: 1024 }) });\n',
  );
  const r = spawnSync(process.env.MVM_MVMCTL!, ["run", "--mode", "plan", script], {
    encoding: "utf8",
    timeout: 120_000,
    env: { ...process.env, MVM_POLICY: policy },
  });
  assert.equal(r.status, 3, r.stdout + r.stderr);
  assert.ok(r.stdout.includes("admission  DENY"), r.stdout);
});
