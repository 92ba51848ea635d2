/**
 * Every method of the TypeScript SDK on a real sandbox, plus the errors mvmd sends, mapped
 * to their typed classes. The tests run in a seeded random order (helpers.ts `test`) and
 * rely on none having run before: most share one sandbox, made on first use (`shared()`)
 * and destroyed after the file, and touch only paths and processes of their own; the
 * lifecycle test (snapshot, pause, stop, destroy) makes its own sandbox.
 */
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import * as http from "node:http";
import { after } from "node:test";
import {
  AgentError,
  LiveBackend,
  Transport,
  CommandFailed,
  CommandResult,
  CommandTimeout,
  ImageNotFound,
  InvalidArgument,
  type LogEvent,
  MvmError,
  PolicyDenied,
  Sandbox,
  SandboxNotFound,
  network,
  secret,
} from "../src/index.js";
import { HOME, IMAGE, SECRET_VALUE, test } from "./helpers.js";
import * as path from "node:path";
import * as fs from "node:fs";
import * as os from "node:os";
import { buildSpec } from "../src/sandbox.js";

const NAME = "ts-shared";
let made: Promise<Sandbox> | null = null;

/** The shared sandbox, made by the first test that asks for it (TTL 30 min, no network). */
function shared(): Promise<Sandbox> {
  made ??= Sandbox.create(IMAGE, {
    name: NAME,
    workloadId: "ts-tests",
    ttl: "30m",
    tags: { team: "x" },
    env: { MODE: "dev" },
    network: network({ mode: "deny" }),
  });
  return made;
}

/** Destroy `sb` if it is still there. */
async function destroyQuietly(sb: Sandbox): Promise<void> {
  try {
    await sb.destroy();
  } catch (err) {
    if (!(err instanceof SandboxNotFound)) throw err;
  }
}

after(async () => {
  const sb = await made?.catch(() => null); // a failed create is that test's failure
  if (sb) await destroyQuietly(sb);
});

interface AuditRecord {
  id: string;
  event: string;
  sandbox: string | null;
  actor: string;
  data: { path?: string };
}

/** The owner's audit chain as mvmd wrote it. */
function auditRecords(): AuditRecord[] {
  return fs
    .readFileSync(path.join(HOME, "audit", "default.jsonl"), "utf8")
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as AuditRecord);
}

async function rejects<E extends MvmError>(p: Promise<unknown>, cls: new (...a: never[]) => E): Promise<E> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${String(err)}`);
    return err;
  }
  assert.fail(`expected ${cls.name}, nothing was thrown`);
}

test("create, info, list, connect, setTtl", async () => {
  const sb = await shared();
  const info = await sb.info();
  assert.deepEqual([info.name, info.state, info.image], [NAME, "running", IMAGE]);
  assert.equal(info.network.preset, "none");
  assert.deepEqual([info.workloadId, info.tags], ["ts-tests", { team: "x" }]);
  assert.ok(info.ttlLeft > 0 && info.ttlLeft <= 30 * 60);
  assert.ok((await Sandbox.list()).some((s) => s.name === NAME));
  const again = await Sandbox.connect(NAME);
  assert.equal(again.id, sb.id);
  assert.equal(await again.state(), "running");
  await sb.setTtl("45m");
  assert.ok((await sb.info()).ttlLeft > 30 * 60);
});

test("errors from mvmd are typed, with message, hint and data", async () => {
  const sb = await shared();
  const missing = await rejects(Sandbox.connect("no-such-sandbox"), SandboxNotFound);
  assert.ok(missing instanceof MvmError && missing.message.includes("no-such-sandbox"));
  const img = await rejects(Sandbox.create("python-3.12"), ImageNotFound);
  assert.ok(img.message.includes("python-3.12"));
  assert.ok(img.hint, "an ImageNotFound carries a hint");
  const known = `${img.message} ${img.hint} ${JSON.stringify(img.data)}`;
  assert.ok(known.includes("python-3.11"), "the error names the images that exist");
  const nofile = await rejects(sb.files.read("/work/no-such-file"), AgentError);
  assert.equal(nofile.data.code, "not_found");
  assert.equal(nofile.errorName, "AgentError");
  // refused before anything is sent
  await rejects(Sandbox.create(IMAGE, { ttl: "soon" }), InvalidArgument);
  await rejects(sb.commands.run(["true"], { timeoutSeconds: "-1s" }), InvalidArgument);
  await rejects(sb.setTtl("forever"), InvalidArgument);
  await rejects(Sandbox.connect("x/../y"), InvalidArgument);
  assert.equal(new InvalidArgument("x").exitCode, 2);
});

test("commands.run returns a typed result", async () => {
  const sb = await shared();
  const r = await sb.commands.run(["sh", "-c", "echo out-$MODE-$EXTRA; echo err >&2; exit 3"], { env: { EXTRA: "e" } });
  assert.ok(r instanceof CommandResult);
  assert.deepEqual([r.exitCode, r.stdout, r.stderr], [3, "out-dev-e\n", "err\n"]);
  assert.ok(!r.truncated && !r.timedOut && !r.placeholder && !r.ok);
  assert.match(r.auditId ?? "", /^\d+-[0-9a-f]{12}$/);
  const rec = auditRecords().find((x) => x.id === r.auditId);
  assert.ok(rec && rec.sandbox === NAME, `the auditId ${r.auditId} names a record of mvmd's chain about ${NAME}`);
  const big = await sb.commands.run(["python3", "-c", "print('x' * 5000)"], { outputLimit: 1000 });
  assert.ok(big.truncated);
  assert.equal(big.stdoutBytes.length, 1000);
  assert.equal((await sb.commands.run(["cat"], { stdin: "from stdin" })).stdout, "from stdin");
  assert.equal((await sb.commands.run("echo $((6 * 7))")).stdout, "42\n");
});

test("check: true throws CommandFailed with the result", async () => {
  const sb = await shared();
  assert.equal((await sb.commands.run(["false"])).exitCode, 1);
  const e = await rejects(sb.commands.run(["sh", "-c", "echo why >&2; exit 4"], { check: true }), CommandFailed);
  assert.equal(e.data.exit_code, 4);
  assert.equal((e.result as CommandResult).stderr, "why\n");
});

test("a timeout throws CommandTimeout; the sandbox is fine afterwards", async () => {
  const sb = await shared();
  const e = await rejects(sb.commands.run(["sh", "-c", "echo started; sleep 30"], { timeoutSeconds: "1s" }), CommandTimeout);
  assert.ok((e.result as CommandResult).timedOut);
  assert.equal(e.exitCode, 124);
  assert.equal((await sb.commands.run(["true"])).exitCode, 0);
});

test("commands.start: streams, wait, sendStdin", async () => {
  const sb = await shared();
  const h = await sb.commands.start(["sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.3; done"]);
  assert.ok(h.pid > 0);
  const chunks: Buffer[] = [];
  for await (const c of h.stdout) chunks.push(c);
  assert.equal(Buffer.concat(chunks).toString(), "line1\nline2\nline3\n");
  const res = await h.wait({ timeoutSeconds: 30 });
  assert.deepEqual([res.exitCode, res.stdout], [0, "line1\nline2\nline3\n"]);
  assert.ok(h.auditId && auditRecords().some((x) => x.id === h.auditId), `the start's auditId ${h.auditId}`);
  const cat = await sb.commands.start(["cat"], { stdinOpen: true });
  await cat.sendStdin("hello ");
  await cat.sendStdin(Buffer.from("stdin"), { eof: true });
  assert.equal((await cat.wait(30)).stdout, "hello stdin");
  const wc = await sb.commands.start(["wc", "-c"], { stdinOpen: true, stdin: "abc" });
  await wc.sendStdin("de");
  await wc.closeStdin();
  assert.equal((await wc.wait(30)).stdout.trim(), "5");
  const quiet = await sb.commands.start(["python3", "-c", "import sys; print('e', file=sys.stderr)"]);
  const errs: Buffer[] = [];
  for await (const c of quiet.stderr) errs.push(c);
  assert.equal(Buffer.concat(errs).toString(), "e\n");
  const closed = await sb.commands.start(["true"]);
  await rejects(closed.sendStdin("x"), InvalidArgument);
});

test("kill, and a bounded wait", async () => {
  const sb = await shared();
  const h = await sb.commands.start(["sleep", "300"]);
  await rejects(h.wait({ timeoutSeconds: 0.5 }), CommandTimeout);
  assert.equal((await h.status()).running, true);
  await h.kill();
  const res = await h.wait(30);
  assert.deepEqual([res.signal, res.exitCode], [9, 137], JSON.stringify(res));
});

test("files: write, read, list, stat, exists, mkdir, rename, remove", async () => {
  const sb = await shared();
  await sb.files.write("/app/main.py", "print('hello from mvm')");
  assert.equal((await sb.commands.run(["python", "/app/main.py"])).stdout, "hello from mvm\n");
  await sb.files.write("/work/input.json", Buffer.from("{}"));
  assert.deepEqual(await sb.files.read("/work/input.json"), Buffer.from("{}"));
  const e = (await sb.files.list("/work")).find((x) => x.name === "input.json");
  assert.ok(e);
  assert.deepEqual([e.type, e.size, e.mode & 0o777], ["file", 2, 0o644]);
  assert.ok(e.mtime > 0);
  assert.equal((await sb.files.stat("/work/input.json")).size, 2);
  assert.ok(await sb.files.exists("/work/input.json"));
  assert.ok(!(await sb.files.exists("/work/nope")));
  await sb.files.mkdir("/work/d/e");
  await sb.files.rename("/work/input.json", "/work/d/e/moved.json");
  assert.ok(!(await sb.files.exists("/work/input.json")));
  assert.deepEqual(await sb.files.read("/work/d/e/moved.json"), Buffer.from("{}"));
  await sb.files.remove("/work/d", { recursive: true });
  assert.ok(!(await sb.files.exists("/work/d")));
  await sb.files.write("/work/run.sh", "#!/bin/sh\necho ran\n", { mode: 0o755 });
  assert.equal((await sb.commands.run(["/work/run.sh"])).stdout, "ran\n");
  await rejects(sb.files.write("relative.txt", "x"), InvalidArgument);
});

test("a secret reaches the command and never its output or the logs", async () => {
  const sb = await shared();
  const ref = secret("api-key");
  assert.ok(!String(ref).includes(SECRET_VALUE) && !JSON.stringify({ ref }).includes(SECRET_VALUE));
  const digest = "import hashlib, os; print(hashlib.sha256(os.environ['API_KEY'].encode()).hexdigest())";
  const d = await sb.commands.run(["python3", "-c", digest], { env: { API_KEY: ref } });
  assert.equal(d.stdout.trim(), createHash("sha256").update(SECRET_VALUE).digest("hex"), "the value arrived");
  const r = await sb.commands.run(["sh", "-c", 'echo "key:$API_KEY"'], { env: { API_KEY: ref } });
  assert.equal(r.stdout, "key:[REDACTED:api-key]\n");
  assert.ok(!(r.stdout + r.stderr).includes(SECRET_VALUE));
  const h = await sb.commands.start(["sh", "-c", 'echo "bg:$API_KEY"'], { env: { API_KEY: ref } });
  assert.ok(!(await h.wait(30)).stdout.includes(SECRET_VALUE));
  const messages: string[] = [];
  for await (const ev of sb.logs()) messages.push(ev.message);
  assert.ok(messages.some((m) => m.includes("bg:")));
  assert.ok(!messages.some((m) => m.includes(SECRET_VALUE)));
});

test("logs: follow until a line shows up, its secret redacted; redaction cannot be turned off", async () => {
  const sb = await shared();
  // The line carries a real secret; the test fails if it never comes (a bounded wait, not
  // a stream that happened to end) and checks the one right message.
  const token = `follow-${randomBytes(4).toString("hex")}`;
  const env = { API_KEY: secret("api-key") };
  await (await sb.commands.start(["sh", "-c", `echo "${token}:$API_KEY"`], { env })).wait(30);
  const it = sb.logs({ follow: true, redact: true })[Symbol.asyncIterator]();
  let found: LogEvent | undefined;
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<"expired">((resolve) => {
    timer = setTimeout(() => resolve("expired"), 60_000);
  });
  let ended: "expired" | "done" | "found" = "done";
  try {
    for (;;) {
      const next = await Promise.race([it.next(), expired]);
      if (next === "expired") {
        ended = "expired";
        break;
      }
      if (next.done) break;
      assert.ok(next.value.timestamp > 0 && next.value.stream);
      if (next.value.message.includes(token)) {
        found = next.value;
        ended = "found";
        break;
      }
    }
  } finally {
    clearTimeout(timer);
    if (ended !== "expired") await it.return?.(); // closes the stream
  }
  assert.equal(ended, "found", "the line never came through logs({ follow: true })");
  assert.equal(found?.message, `${token}:[REDACTED:api-key]`);
  assert.throws(() => sb.logs({ redact: false }), InvalidArgument);
});

function get(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: 5000 }, (res) => {
      const parts: Buffer[] = [];
      res.on("data", (c: Buffer) => parts.push(c));
      res.on("end", () => resolve(Buffer.concat(parts).toString()));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", reject);
  });
}

test("included host files are declared as uploads: mvmd holds them to mount_roots", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mvts-inc-"));
  fs.writeFileSync(path.join(dir, "data.txt"), "x");
  const policy = path.join(HOME, "policy.toml");
  fs.writeFileSync(policy, 'mount_roots = ["/nonexistent-root"]\n');
  try {
    const spec = buildSpec(IMAGE, { name: "ts-inc", include: ["data.txt"] }, dir);
    const err = await rejects(new LiveBackend().create(spec), PolicyDenied);
    assert.ok(err.message.includes("[mounts]"), err.message);
  } finally {
    fs.rmSync(policy, { force: true });
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("ports.forward reaches a guest server; wildcard is refused", async () => {
  const sb = await shared();
  await sb.files.write("/work/www/index.html", "served by the guest");
  const server = await sb.commands.start(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", "/work/www"]);
  await rejects(sb.ports.forward({ guestPort: 8000, host: "0.0.0.0" }), PolicyDenied);
  let id = "";
  {
    await using fwd = await sb.ports.forward({ host: "127.0.0.1", hostPort: 0, guestPort: 8000 });
    id = fwd.id;
    assert.ok(fwd.host === "127.0.0.1" && fwd.hostPort > 0);
    let body = "";
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      try {
        body = await get(`http://127.0.0.1:${fwd.hostPort}/index.html`);
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 300)); // the server is still starting
      }
    }
    assert.equal(body, "served by the guest");
    assert.ok((await sb.info()).forwards.some((f) => f.id === id));
  }
  await server.kill();
  assert.ok(!(await sb.info()).forwards.some((f) => f.id === id), "await using closed the forward");
});

/** mvmd's audit records (the owner's chain) of `event` about `NAME` whose data.path is `p`. */
function auditActors(event: string, p: string): string[] {
  return auditRecords()
    .filter((r) => r.event === event && r.sandbox === NAME && r.data.path === p)
    .map((r) => r.actor);
}

test("MVM_ACTOR labels the owner's calls in mvmd's audit (X-Mvm-Actor); a bad label is refused", async () => {
  const sb = await shared();
  const old = process.env.MVM_ACTOR;
  try {
    process.env.MVM_ACTOR = "ts-bot@ci";
    const fromEnv = new Sandbox(new LiveBackend(new Transport()), await sb.info());
    await fromEnv.files.mkdir("/work/by-env");
    delete process.env.MVM_ACTOR;
    const given = new Sandbox(new LiveBackend(new Transport({ actor: "ts-given" })), await sb.info());
    await given.files.mkdir("/work/by-option");
    const plain = new Sandbox(new LiveBackend(new Transport()), await sb.info());
    await plain.files.mkdir("/work/by-nobody");
    assert.deepEqual(auditActors("fs.mkdir", "/work/by-env"), ["ts-bot@ci"]);
    assert.deepEqual(auditActors("fs.mkdir", "/work/by-option"), ["ts-given"]);
    assert.deepEqual(auditActors("fs.mkdir", "/work/by-nobody"), ["mvmd"]);
    process.env.MVM_ACTOR = "not a label";
    assert.throws(() => new Transport(), InvalidArgument);
    assert.throws(() => new Transport({ actor: "x".repeat(65) }), /invalid actor/);
  } finally {
    if (old === undefined) delete process.env.MVM_ACTOR;
    else process.env.MVM_ACTOR = old;
  }
});

test("MVM_URL needs MVM_TOKEN and an http(s) URL, as in Python", () => {
  assert.throws(() => new Transport({ url: "http://127.0.0.1:1", token: "" }), /MVM_URL is set but MVM_TOKEN is not/);
  assert.throws(() => new Transport({ url: "unix:///x", token: "t" }), InvalidArgument);
  assert.throws(() => new Transport({ url: "not a url", token: "t" }), InvalidArgument);
});

test("snapshot, pause, resume, resume from a snapshot, stop, destroy (its own sandbox)", async () => {
  const name = "ts-lifecycle";
  const sb = await Sandbox.create(IMAGE, { name, ttl: "30m" });
  try {
    await sb.files.write("/work/before.txt", "kept");
    const snap = await sb.snapshot({ name: "after-index" });
    assert.equal(snap.id, "after-index");
    assert.ok(snap.size > 0);
    await sb.files.write("/work/after.txt", "dropped by the restore");
    await sb.pause();
    assert.equal(await sb.state(), "paused");
    await sb.resume();
    assert.equal(await sb.state(), "running");
    await sb.resume({ snapshot: snap.id });
    assert.equal(await sb.state(), "running");
    assert.ok((await sb.files.exists("/work/before.txt")) && !(await sb.files.exists("/work/after.txt")));
    await sb.stop(); // the VM goes; the snapshot stays
    await rejects(sb.info(), SandboxNotFound);
    await sb.resume({ snapshot: snap }); // recreated from the snapshot
    assert.deepEqual(await sb.files.read("/work/before.txt"), Buffer.from("kept"));
    await sb.kill(); // the cookbook's name for stop()
    await rejects(sb.info(), SandboxNotFound);
    await sb.destroy(); // a stopped sandbox: its snapshots go
    assert.ok(!(await Sandbox.list()).some((s) => s.name === name));
    await rejects(sb.resume({ snapshot: snap }), MvmError); // the snapshot went with destroy
  } finally {
    await destroyQuietly(sb);
  }
});
