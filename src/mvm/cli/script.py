"""SDK scripts from the CLI: ``mvmctl compile SCRIPT --out DIR`` and
``mvmctl run --mode plan|live SCRIPT-or-DIR``.

Record mode runs the script in a subprocess of the same interpreter
(``python -m mvm.sdk.runner``) with ``MVM_SDK_MODE=record`` and a private recording
directory: the script runs on the host as in live mode, but no VM starts.

TypeScript and JavaScript scripts (``.ts``/``.mts``/``.js``/``.mjs``...) run the same way
under Node through the TypeScript SDK's runner (``sdk-ts``, which brings tsx for
TypeScript); their recording is the same IR, so plan mode's admission and replay are
the ones Python scripts get.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from rich.markup import escape

from mvm.cli.common import fail_on_errors
from mvm.cli.ui import err_console
from mvm.errors import HostError, InvalidArgument
from mvm.policy import admission
from mvm.sdk import images
from mvm.sdk import ir as IRm
from mvm.sdk import plan as planmod
from mvm.sdk.mode import MODE_ENV, RECORD_DIR_ENV
from mvm.sdk.record import copy_tree
from mvm.sdk.replay import replay

#: Bound on one recording run of a script (it starts no VM, so this is generous).
RECORD_TIMEOUT = 600.0
#: Exit status of plan mode when admission denies a sandbox.
DENIED_EXIT = 3


def _script(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(
            f"{path} is not a file", hint="give an SDK script (or, for --mode live, an IR dir)"
        )
    return p


#: Script suffixes run with Node through the TypeScript SDK's runner.
NODE_SUFFIXES = (".ts", ".mts", ".cts", ".js", ".mjs", ".cjs")
#: The image names record mode accepts, handed to a Node script (Python checks its own).
KNOWN_IMAGES_ENV = "MVM_SDK_KNOWN_IMAGES"


def is_node_script(script: Path) -> bool:
    return script.suffix.lower() in NODE_SUFFIXES


def node_command(script: Path) -> list[str]:
    """``node RUNNER SCRIPT``: Node from ``MVM_NODE`` or PATH, the runner of the built
    TypeScript SDK (``MVM_SDK_TS``, else ``sdk-ts/`` of the source tree)."""
    node = os.environ.get("MVM_NODE") or shutil.which("node")
    if not node:
        raise HostError(
            f"{script} is a TypeScript/JavaScript script and Node.js is not installed",
            hint="install it (./install.sh does: apt-get install nodejs npm), or set MVM_NODE",
        )
    sdk = Path(os.environ.get("MVM_SDK_TS") or Path(__file__).resolve().parents[3] / "sdk-ts")
    runner = sdk / "dist" / "src" / "runner.js"
    if not runner.is_file():
        raise HostError(
            f"the TypeScript SDK is not built ({runner} is missing)",
            hint=f"run ./install.sh, or: cd {sdk} && npm ci && npx tsc -p .",
        )
    return [node, str(runner), str(script)]


def run_script(
    script: Path, mode: str, record_dir: Path | None = None, quiet_stdout: bool = False
) -> int:
    """Run ``script`` through the SDK runner in ``mode`` (live or record); its exit status.
    ``quiet_stdout`` sends the script's stdout to stderr (so --json output stays JSON)."""
    env = {**os.environ, MODE_ENV: mode}
    env.pop(RECORD_DIR_ENV, None)
    if record_dir is not None:
        env[RECORD_DIR_ENV] = str(record_dir)
    env.pop(KNOWN_IMAGES_ENV, None)
    if is_node_script(script):
        cmd = node_command(script)
        mvmctl = Path(sys.executable).parent / "mvmctl"
        if not env.get("MVM_MVMCTL") and mvmctl.is_file():
            env["MVM_MVMCTL"] = str(mvmctl)  # how the SDK starts mvmd if it is not running
        if mode == "record":
            env[KNOWN_IMAGES_ENV] = json.dumps(images.known_images())
    else:
        cmd = [sys.executable, "-m", "mvm.sdk.runner", str(script)]
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            check=False,
            timeout=RECORD_TIMEOUT if mode == "record" else None,
            stdout=sys.stderr if quiet_stdout else None,
        )
    except subprocess.TimeoutExpired:
        raise InvalidArgument(
            f"recording {script} took longer than {RECORD_TIMEOUT:g}s",
            hint="a script in record mode should not wait on anything but the SDK",
        ) from None
    return proc.returncode


def record(script: Path, out: Path, quiet_stdout: bool = False) -> tuple[int, IRm.IR | None]:
    """Record ``script`` into ``out`` (ir.json + files/)."""
    code = run_script(script, "record", out, quiet_stdout)
    if not (out / "ir.json").is_file():
        return code, None
    return code, IRm.load(out)


@click.command("compile")
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for ir.json and files/ (made if missing).",
)
@fail_on_errors
def compile_command(script: Path, out: Path) -> None:
    """Record SCRIPT (no VM starts) into DIR/ir.json plus included files by hash.

    \b
    Replay it with: mvmctl run --mode live DIR
    """
    _script(str(script))
    with tempfile.TemporaryDirectory(prefix="mvm-rec-") as tmp:
        code, ir = record(script, Path(tmp))
        if code != 0 or ir is None:
            sys.exit(code or 1)
        copy_tree(Path(tmp), out)
    files = len(list((out / "files").iterdir()))
    click.echo(
        f"wrote {out / 'ir.json'}: {len(ir.sandboxes)} sandbox(es), "
        f"{len(ir.operations)} operation(s), {files} file(s)"
    )


def print_plan(views: list[planmod.SandboxPlanView], ir: IRm.IR) -> None:
    out = click.echo
    for v in views:
        d = v.decl
        out(f"sandbox {d.ref}" + (f" ({d.name})" if d.name else ""))
        out(f"  image      {d.image}")
        disk = f", writable layer {d.disk_mb} MiB" if d.disk_mb else ""
        out(f"  resources  {d.cpus} CPU, {d.memory_mb} MiB{disk}")
        allow = f" + allow {', '.join(d.network.allow)}" if d.network.allow else ""
        out(f"  network    {d.network.preset}{allow}")
        out(f"  ttl        {d.ttl_seconds:g}s")
        if d.workload_id:
            out(f"  workload   {d.workload_id}")
        if d.env:
            out(f"  env        {', '.join(sorted(d.env))}")
        if v.plan.secrets:
            out(f"  secrets    {', '.join(v.plan.secrets)} (names; values stay on the host)")
        if d.includes:
            size = sum(i.size for i in d.includes)
            out(f"  includes   {len(d.includes)} file(s), {size} bytes -> /work/")
            for i in d.includes[:20]:
                out(f"             /work/{i.path}  sha256:{i.sha256[:12]}")
        verdict = "allow" if v.decision.allowed else "DENY"
        out(f"  admission  {verdict}")
        for den in v.decision.denials:
            out(f"             [{den.rule}] {den.message}")
        for note in v.decision.notes:
            out(f"             note: {note}")
    out(f"operations ({len(ir.operations)})")
    for op in ir.operations[: planmod.MAX_LISTED_OPS]:
        out(f"  {op.seq:>3}  {planmod.describe_op(op)}")
    if len(ir.operations) > planmod.MAX_LISTED_OPS:
        out(f"  ... {len(ir.operations) - planmod.MAX_LISTED_OPS} more")


def run_mode(mode: str, target: str, as_json: bool) -> int:
    """``mvmctl run --mode MODE TARGET``; returns the exit status."""
    if mode == "live":
        p = Path(target)
        if p.is_dir():
            replay(p, sys.stdout.buffer, sys.stderr.buffer)
            return 0
        return run_script(_script(target), "live")
    script = _script(target)
    with tempfile.TemporaryDirectory(prefix="mvm-plan-") as tmp:
        code, ir = record(script, Path(tmp), quiet_stdout=as_json)
    if code != 0 or ir is None:
        return code or 1
    views = planmod.decide(ir, admission.load_policy(), images.known_images())
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ir": IRm.wire(ir),
                    "decisions": [
                        {
                            "sandbox": v.decl.ref,
                            "allowed": v.decision.allowed,
                            "denials": [
                                {"rule": d.rule, "message": d.message} for d in v.decision.denials
                            ],
                            "notes": list(v.decision.notes),
                        }
                        for v in views
                    ],
                }
            )
        )
    else:
        print_plan(views, ir)
    denied = [v for v in views if not v.decision.allowed]
    if denied and not as_json:
        err_console.print(
            f"[bold red]mvm:[/] admission would deny {escape(', '.join(v.decl.ref for v in denied))}"
        )
    return DENIED_EXIT if denied else 0
