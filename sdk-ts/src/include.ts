/**
 * `include: [...]`: which host files enter the guest, checked before anything is sent (as
 * `mvm/sdk/include.py`). Paths are relative to the script's directory and land under
 * `/work/<path>`. Bounded in count and bytes; absolute paths, `..` and symlinks leaving
 * the tree are refused; directory symlinks are not followed.
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { InvalidArgument } from "./errors.js";
import type { IncludeFile } from "./models.js";

export const MAX_FILES = 1000;
export const MAX_BYTES = 64 * 1024 * 1024;

/** The directory include paths are relative to: the running script's (argv[1]), else the cwd. */
export function scriptDir(): string {
  const main = process.argv[1];
  if (main) {
    try {
      if (fs.statSync(main).isFile()) return path.dirname(fs.realpathSync(main));
    } catch {
      // not a file: fall through
    }
  }
  return process.cwd();
}

/** The relative POSIX path an entry names, or InvalidArgument. */
export function checkEntry(entry: unknown): string {
  if (typeof entry !== "string" || entry === "" || entry.includes("\0")) {
    throw new InvalidArgument(`include entry ${JSON.stringify(entry)} is not a path`);
  }
  if (entry.startsWith("/")) {
    throw new InvalidArgument(`include entry '${entry}' is absolute`, {
      hint: "include paths are relative to the script's directory",
      data: { entry },
    });
  }
  const parts = entry.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) throw new InvalidArgument(`include entry '${entry}' contains '..'`, { data: { entry } });
  return parts.join("/");
}

function checkedStat(root: string, p: string): fs.Stats {
  let lst: fs.Stats;
  try {
    lst = fs.lstatSync(p);
  } catch {
    throw new InvalidArgument(`include: ${p} does not exist`, {
      hint: `include paths are relative to the script's directory (${root})`,
      data: { path: p },
    });
  }
  if (lst.isSymbolicLink()) {
    const target = fs.realpathSync(p);
    if (target !== root && !target.startsWith(root + path.sep)) {
      throw new InvalidArgument(`include: ${path.relative(root, p)} is a symlink leaving ${root}`, { data: { path: p } });
    }
    return fs.statSync(target);
  }
  return lst;
}

/** Every file under `entries` (relative to `base`), sorted, within the bounds. */
export function collect(base: string, entries: readonly string[]): IncludeFile[] {
  if (typeof entries === "string" || !Array.isArray(entries)) {
    throw new InvalidArgument("include takes a list of paths, not a string");
  }
  const root = fs.realpathSync(base);
  const found = new Map<string, IncludeFile>();
  let total = 0;
  const add = (p: string): void => {
    const rel = path.relative(root, p).split(path.sep).join("/");
    if (found.has(rel)) return;
    const st = checkedStat(root, p);
    if (!st.isFile()) throw new InvalidArgument(`include: ${rel} is not a regular file`, { data: { path: rel } });
    total += st.size;
    if (found.size + 1 > MAX_FILES || total > MAX_BYTES) {
      throw new InvalidArgument(`include brings more than ${MAX_FILES} files or ${MAX_BYTES >> 20} MiB`, {
        hint: "include less, or copy large data with files.write in pieces",
        data: { max_files: MAX_FILES, max_bytes: MAX_BYTES },
      });
    }
    const data = fs.readFileSync(p);
    found.set(rel, {
      rel,
      sha256: createHash("sha256").update(data).digest("hex"),
      size: data.length,
      mode: st.mode & 0o111 ? 0o755 : 0o644,
      source: p,
    });
  };
  const walk = (dir: string): void => {
    const names = fs.readdirSync(dir).sort();
    for (const name of names) {
      const p = path.join(dir, name);
      const lst = fs.lstatSync(p);
      if (lst.isDirectory()) walk(p);
      else if (lst.isSymbolicLink() && fs.statSync(p).isDirectory()) {
        throw new InvalidArgument(`include: ${path.relative(root, p)} is a directory symlink (not followed)`);
      } else add(p);
    }
  };
  for (const entry of entries) {
    const p = path.join(root, checkEntry(entry));
    checkedStat(root, p);
    const lst = fs.lstatSync(p);
    if (lst.isDirectory()) walk(p);
    else add(p);
  }
  return [...found.keys()].sort().map((k) => found.get(k)!);
}
