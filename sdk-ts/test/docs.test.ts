/**
 * Every ```ts block of docs/sdk-ts.md runs live through `mvmctl run --mode live`, next to
 * a `src/` directory holding `tool.py` (the secret `api-key` is stored by run-tests.sh).
 * The first block is the reference cookbook's TypeScript example with python-3.11;
 * README.md's TypeScript example runs the same way.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { SECRET_VALUE, docBlocks, mvmctl, sandboxNames, test } from "./helpers.js";

test("the docs' (and README's) examples run live, leave no sandbox behind, and never show the secret", () => {
  const existing = sandboxNames().sort();
  const blocks = docBlocks();
  assert.ok(blocks.length >= 3, "docs/sdk-ts.md has its examples");
  assert.ok(blocks[0]!.includes('Sandbox.create("python-3.11"'), "the first block is the cookbook's");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mvts-docs-"));
  try {
    fs.mkdirSync(path.join(dir, "src"));
    fs.writeFileSync(path.join(dir, "src", "tool.py"), "print('tool ran')\n");
    const readme = docBlocks("README.md");
    assert.equal(readme.length, 1, "README.md's TypeScript example");
    [...blocks, ...readme].forEach((block, i) => {
      const script = path.join(dir, `example_${i}.ts`);
      fs.writeFileSync(script, block);
      const r = mvmctl(["run", "--mode", "live", script], { cwd: dir });
      const out = r.stdout + r.stderr;
      assert.ok(!out.includes(SECRET_VALUE), `docs example ${i} printed the secret value`);
      assert.equal(r.code, 0, `docs/sdk-ts.md example ${i}:\n${block}\n${out}`);
    });
    assert.deepEqual(sandboxNames().sort(), existing, "every example stopped its sandboxes");
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
