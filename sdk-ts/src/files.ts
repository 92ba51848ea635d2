/**
 * `sandbox.files`: the guest's filesystem. Paths are absolute guest paths; data read back
 * comes from the guest and is untrusted. Mirrors `mvm/sdk/files.py`.
 */
import { type Data, type Target, asBytes } from "./commands.js";
import { AgentError, InvalidArgument } from "./errors.js";
import type { FileEntry, FileStat } from "./models.js";

/** Largest `files.write` and `files.read` (mvmd's bounds). */
export const MAX_WRITE = 64 * 1024 * 1024;
export const MAX_PATH = 4096;

export function checkPath(p: unknown, what = "path"): string {
  if (typeof p !== "string" || !p.startsWith("/") || p.includes("\0")) {
    throw new InvalidArgument(`${what} must be an absolute guest path, not ${JSON.stringify(p)}`);
  }
  if (p.length > MAX_PATH) throw new InvalidArgument(`${what} is longer than ${MAX_PATH} characters`);
  return p;
}

export class Files {
  constructor(private readonly sb: Target) {}

  /** Write a whole file (a string is UTF-8); missing parent directories are made. */
  async write(path: string, data: Data, opts: { mode?: number } = {}): Promise<void> {
    const body = asBytes(data);
    if (body.length > MAX_WRITE) {
      throw new InvalidArgument(`files.write takes at most ${MAX_WRITE >> 20} MiB`, {
        data: { size: body.length, max: MAX_WRITE },
      });
    }
    const mode = opts.mode ?? 0o644;
    if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
      throw new InvalidArgument(`invalid file mode ${String(mode)}`);
    }
    await this.sb.backend.write(this.sb.key, checkPath(path), body, mode);
  }

  /** The file's bytes (at most 64 MiB). */
  read(path: string): Promise<Buffer> {
    return this.sb.backend.read(this.sb.key, checkPath(path));
  }

  /** Entries (name, type, size, mode, mtime) of a directory. */
  list(path = "/work"): Promise<FileEntry[]> {
    return this.sb.backend.listDir(this.sb.key, checkPath(path));
  }

  stat(path: string): Promise<FileStat> {
    return this.sb.backend.stat(this.sb.key, checkPath(path));
  }

  /** True if `path` exists (always true in record mode: nothing is known there). */
  async exists(path: string): Promise<boolean> {
    try {
      await this.stat(path);
    } catch (err) {
      if (err instanceof AgentError && err.data.code === "not_found") return false;
      throw err;
    }
    return true;
  }

  async mkdir(path: string, opts: { parents?: boolean } = {}): Promise<void> {
    await this.sb.backend.mkdir(this.sb.key, checkPath(path), opts.parents ?? true);
  }

  async remove(path: string, opts: { recursive?: boolean } = {}): Promise<void> {
    await this.sb.backend.remove(this.sb.key, checkPath(path), opts.recursive === true);
  }

  async rename(src: string, dest: string): Promise<void> {
    await this.sb.backend.rename(this.sb.key, checkPath(src, "src"), checkPath(dest, "dest"));
  }
}
