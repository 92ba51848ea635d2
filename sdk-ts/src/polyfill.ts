/**
 * `Symbol.dispose` / `Symbol.asyncDispose` where the runtime lacks them (Node 18), so
 * `using` / `await using` (lowered by TypeScript or esbuild) find the same symbols the
 * SDK's classes are keyed by. Imported first by every module that defines a disposer.
 */
const S = Symbol as unknown as { dispose?: symbol; asyncDispose?: symbol };
if (typeof S.dispose !== "symbol") {
  Object.defineProperty(Symbol, "dispose", { value: Symbol.for("Symbol.dispose") });
}
if (typeof S.asyncDispose !== "symbol") {
  Object.defineProperty(Symbol, "asyncDispose", { value: Symbol.for("Symbol.asyncDispose") });
}

export {};
