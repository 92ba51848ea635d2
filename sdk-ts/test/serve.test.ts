/**
 * `MVM_URL` + `MVM_TOKEN` against a real `mvmctl serve` (in front of this home's mvmd): a
 * TypeScript script with an empty MVM_HOME of its own (no socket to fall back on) makes,
 * uses and destroys a sandbox over TCP; the tenant's audit chain names the token (not
 * `MVM_ACTOR`, which only labels the owner's socket calls); a wrong token is refused.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { after, before } from "node:test";
import { HOME, MVMCTL, mvmctl, runScript, sandboxNames, test, waitUntil } from "./helpers.js";

const TENANT = "tsacme";
let server: ChildProcess | null = null;
let url = "";
let token = "";
let tokenId = "";
let dir = "";

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

function statusOf(u: string): Promise<number> {
  return new Promise((resolve) => {
    const req = http.get(`${u}/v1/status`, { timeout: 2000 }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(0));
  });
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "mvts-serve-"));
  const made = mvmctl(["token", "create", "--tenant", TENANT, "--json"], { timeout: 60 });
  assert.equal(made.code, 0, made.stderr);
  ({ token, id: tokenId } = JSON.parse(made.stdout) as { token: string; id: string });
  const port = await freePort();
  url = `http://127.0.0.1:${port}`;
  const log = fs.openSync(path.join(dir, "serve.log"), "w");
  server = spawn(MVMCTL, ["serve", "--listen", `127.0.0.1:${port}`], {
    env: process.env,
    stdio: ["ignore", log, log],
  });
  fs.closeSync(log);
  // without a token the server answers 401: it is up
  const up = await waitUntil(async () => (await statusOf(url)) === 401, 120);
  assert.ok(up, fs.readFileSync(path.join(dir, "serve.log"), "utf8"));
});

after(async () => {
  if (server && server.exitCode === null && server.signalCode === null) {
    const gone = new Promise((r) => server!.once("exit", r));
    server.kill("SIGTERM");
    const timer = setTimeout(() => server!.kill("SIGKILL"), 20_000);
    await gone;
    clearTimeout(timer);
  }
  fs.rmSync(dir, { recursive: true, force: true });
});

const SCRIPT = `
import * as mvm from "@mvm/sdk";
import assert from "node:assert/strict";

const sb = await mvm.Sandbox.create("python-3.11", { name: "ts-remote", ttl: "10m", env: { MODE: "remote" } });
try {
  const r = await sb.commands.run(["sh", "-c", "echo out-$MODE; echo err >&2; exit 3"]);
  assert.deepEqual([r.exitCode, r.stdout, r.stderr], [3, "out-remote\\n", "err\\n"]);
  const h = await sb.commands.start(["cat"], { stdinOpen: true });
  await h.sendStdin("piped", { eof: true });
  assert.equal((await h.wait(60)).stdout, "piped");
  await sb.files.write("/work/r.txt", "over tcp");
  assert.equal((await sb.files.read("/work/r.txt")).toString(), "over tcp");
  assert.ok((await sb.files.list("/work")).some((e) => e.name === "r.txt"));
  await sb.files.remove("/work/r.txt");
  assert.ok((await mvm.Sandbox.list()).some((s) => s.name === "ts-remote"));
  const again = await mvm.Sandbox.connect("ts-remote");
  assert.equal(await again.state(), "running");
  const seen: string[] = [];
  for await (const ev of sb.logs()) seen.push(ev.message);
  await assert.rejects(mvm.Sandbox.create("python-3.12"), mvm.ImageNotFound);
} finally {
  await sb.destroy();
}
await assert.rejects(mvm.Sandbox.connect("ts-remote"), mvm.SandboxNotFound);
console.log("remote ts ok");
`;

test("a TS script over MVM_URL/MVM_TOKEN: create, run, start, files, list, connect, logs, destroy", () => {
  const script = path.join(dir, "remote.ts");
  fs.writeFileSync(script, SCRIPT);
  const empty = fs.mkdtempSync(path.join(dir, "home-"));
  const before = sandboxNames().length;
  const r = runScript(script, { MVM_URL: url, MVM_TOKEN: token, MVM_HOME: empty, MVM_ACTOR: "ignored-remotely" });
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.ok(r.stdout.trim().endsWith("remote ts ok"), r.stdout);
  assert.deepEqual(fs.readdirSync(empty), [], "no local daemon was started");
  assert.equal(sandboxNames().length, before, "the remote sandbox is gone");
  // mvmd recorded the tenant's calls in the tenant's chain, with the token as actor
  const chain = path.join(HOME, "audit", `${TENANT}.jsonl`);
  const recs = fs
    .readFileSync(chain, "utf8")
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as { actor: string; tenant: string });
  assert.ok(recs.some((x) => x.actor === tokenId));
  assert.ok(recs.every((x) => x.actor === tokenId || x.actor === "mvmd"), "MVM_ACTOR is not sent over TCP");
  assert.ok(!fs.readFileSync(chain, "utf8").includes(token));
});

test("a wrong token is refused with an error, not a hang", () => {
  const script = path.join(dir, "denied.mjs");
  fs.writeFileSync(
    script,
    'import { Sandbox } from "@mvm/sdk";\nawait Sandbox.list();\nconsole.log("listed");\n',
  );
  const empty = fs.mkdtempSync(path.join(dir, "home-"));
  const r = runScript(script, { MVM_URL: url, MVM_TOKEN: "mvm_tdeadbeef00_wrong", MVM_HOME: empty }, 120);
  assert.equal(r.code, 125, r.stdout + r.stderr);
  assert.ok(r.stderr.includes("mvm: ") && r.stderr.includes("401"), r.stderr);
  assert.ok(!r.stdout.includes("listed"));
  const none = runScript(script, { MVM_URL: url, MVM_TOKEN: "", MVM_HOME: empty }, 120);
  assert.equal(none.code, 2, none.stderr);
  assert.ok(none.stderr.includes("MVM_URL is set but MVM_TOKEN is not"), none.stderr);
});
