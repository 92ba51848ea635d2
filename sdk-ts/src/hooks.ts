/**
 * Module hooks the runner registers (`module.register`): a script imports the SDK as
 * `@mvm/sdk` wherever it lives (no node_modules next to it needed), and TypeScript
 * scripts are ES modules (top-level `await` / `await using`) unless their package.json
 * says "commonjs". Runs in Node's loader thread: no SDK state here.
 */

interface Data {
  sdk: string;
}

interface ResolveResult {
  url: string;
  format?: string | null;
  shortCircuit?: boolean;
}

type NextResolve = (specifier: string, context: unknown) => Promise<ResolveResult>;

let sdkUrl = "";

export function initialize(data: Data): void {
  sdkUrl = data.sdk;
}

export async function resolve(specifier: string, context: unknown, next: NextResolve): Promise<ResolveResult> {
  if (specifier === "@mvm/sdk") return { url: sdkUrl, format: "module", shortCircuit: true };
  const r = await next(specifier, context);
  const url = r.url;
  if (url.startsWith("file:") && !url.includes("/node_modules/") && /\.(ts|mts|tsx)$/.test(url)) {
    if (r.format !== "commonjs" || !(await saysCommonJs(url))) return { ...r, format: "module" };
  }
  return r;
}

/** True when the nearest package.json of `url` declares "type": "commonjs". */
async function saysCommonJs(url: string): Promise<boolean> {
  const fs = await import("node:fs");
  const path = await import("node:path");
  const { fileURLToPath } = await import("node:url");
  let dir = path.dirname(fileURLToPath(url));
  for (;;) {
    const pj = path.join(dir, "package.json");
    if (fs.existsSync(pj)) {
      try {
        return (JSON.parse(fs.readFileSync(pj, "utf8")) as { type?: unknown }).type === "commonjs";
      } catch {
        return false;
      }
    }
    const up = path.dirname(dir);
    if (up === dir) return false;
    dir = up;
  }
}
