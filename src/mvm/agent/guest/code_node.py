"""run_code's node contexts: one ``node`` process on pipes, driven by code_server.py.

Cells run with ``vm.Script.runInContext`` in one context that lives as long as the
process, so variables (``let``/``const`` too), functions and ``require``d modules survive
between cells; the completion value of a cell is its value (``util.inspect``), and a
Promise it ends with is awaited. Output goes to node's stdout/stderr (pipes we forward);
each cell's result comes back as a JSON line on fd 3. SIGINT interrupts a running cell
(``breakOnSigint``, or the awaited Promise) without ending the process.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mvm.agent.guest.code_bash import BashKernel
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from code_bash import BashKernel

NODE_SERVER = r"""
(() => {
  const vm = require('vm'), util = require('util'), fs = require('fs');
  const readline = require('readline');
  const fd = Number(process.env.MVM_RESULT_FD);
  delete process.env.MVM_RESULT_FD;
  const send = (o) => fs.writeSync(fd, JSON.stringify(o) + '\n');
  const clip = (s, n) => (s.length > n ? s.slice(0, n) + '\n...[truncated by mvm]' : s);
  let interrupt = null;
  process.on('SIGINT', () => { if (interrupt) interrupt(); });
  const g = {
    console, process, Buffer, require, module: { exports: {} },
    setTimeout, clearTimeout, setInterval, clearInterval, setImmediate, clearImmediate,
    queueMicrotask, structuredClone, URL, URLSearchParams, TextEncoder, TextDecoder,
    AbortController, fetch: globalThis.fetch,
  };
  g.global = g;
  const ctx = vm.createContext(g);
  const INTERRUPTED = 'ERR_SCRIPT_EXECUTION_INTERRUPTED';
  const errorOf = (e) => {
    if (e && e.code === INTERRUPTED) return { name: 'KeyboardInterrupt', value: '', traceback: '' };
    if (e && typeof e === 'object' && typeof e.message === 'string') {
      const stack = String(e.stack || '').split('\n')
        .filter((l) => !/\(node:|at node:|\[eval\]/.test(l)).join('\n');
      return { name: String(e.name || 'Error'), value: clip(e.message, 65536),
               traceback: clip(stack, 262144) };
    }
    return { name: 'Thrown', value: clip(util.inspect(e), 65536), traceback: '' };
  };
  let n = 0;
  async function run(line) {
    let msg;
    try { msg = JSON.parse(line); } catch (e) { msg = null; }
    if (!msg || typeof msg.code !== 'string') {
      send({ status: 'error', error: { name: 'BadRequest', value: '', traceback: '' } });
      return;
    }
    n += 1;
    let value = null, error = null;
    try {
      const script = new vm.Script(msg.code, { filename: `<cell ${n}>` });
      let result = script.runInContext(ctx, { breakOnSigint: true, displayErrors: false });
      if (result && typeof result.then === 'function') {
        result = await new Promise((resolve, reject) => {
          interrupt = () => reject(Object.assign(new Error('interrupted'), { code: INTERRUPTED }));
          result.then(resolve, reject);
        });
      }
      if (result !== undefined) {
        g._ = result;
        value = { 'text/plain': clip(util.inspect(result), 1 << 20) };
      }
    } catch (e) {
      error = errorOf(e);
    } finally {
      interrupt = null;
    }
    send({ status: error ? 'error' : 'ok', value, error, exec_count: n });
  }
  let chain = Promise.resolve();
  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  rl.on('line', (line) => { chain = chain.then(() => run(line)); });
  send({ ready: true });
})();
"""


class NodeKernel(BashKernel):
    """A node process on pipes, in its own process group (SIGINT interrupts its cell)."""

    language = "node"

    def start(self) -> None:
        import subprocess

        if self.proc is not None:  # a restart: let go of the old process's pipes
            os.close(self.status_fd)
            for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                f.close()
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            ["node", "-e", NODE_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(w,),
            env=dict(os.environ, MVM_RESULT_FD=str(w)),
            process_group=0,
            close_fds=True,
        )
        os.close(w)
        self.status_fd = r
        self.status_buf = b""
        self._pump_line(discard=True)  # {"ready": true}, or None if node is missing

    def run(self, code: str) -> dict[str, Any]:
        self.count += 1
        if self.proc.poll() is not None:
            self.start()
        assert self.proc.stdin is not None
        self.running = True
        try:
            self.proc.stdin.write(json.dumps({"code": code}).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        line = self._pump_line()
        self.running = False
        try:
            rec = json.loads(line) if line is not None else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            return {
                "status": "error",
                "value": None,
                "exec_count": self.count,
                "error": {
                    "name": "NodeExited",
                    "value": "node exited; the next cell starts a new one (state is lost)",
                    "traceback": "",
                },
            }
        rec["exec_count"] = self.count
        return rec
