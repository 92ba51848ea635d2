"""``mvmctl audit tail|show|verify|checkpoint`` and ``mvmctl receipt verify``: read the
audit trail, and anchor its head.

These read files under ``$MVM_HOME/audit`` directly (no daemon needed), so they
work while mvmd is down and cannot be fooled by it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from mvm import audit as audit_mod
from mvm.audit import checkpoint as cpmod
from mvm.audit import keys, receipt
from mvm.audit.encoding import AuditError
from mvm.cli.common import fail_on_errors
from mvm.cli.ui import err_console


def _log() -> audit_mod.AuditLog:
    return audit_mod.default_log()


def _line(rec: dict[str, Any]) -> str:
    data = rec.get("data") if isinstance(rec.get("data"), dict) else {}
    assert isinstance(data, dict)
    bits = " ".join(f"{k}={json.dumps(v)[:80]}" for k, v in sorted(data.items()))
    sb = rec.get("sandbox") or "-"
    return (
        f"{rec.get('seq')!s:>6} {rec.get('time', '')!s:<27} {rec.get('actor', '')!s:<7} "
        f"{rec.get('event', '')!s:<22} {sb!s:<16} {rec.get('id', '')} {bits}"
    )


def _pubkey(path: Path | None) -> Any:
    if path is None:
        return keys.load_public(audit_mod.audit_dir())
    try:
        return keys.pub_from_b64(path.read_text())
    except OSError as e:
        raise AuditError(f"cannot read {path}: {e.strerror}", hint="check the path") from e


@click.group()
def audit() -> None:
    """Read and verify the audit log (hash-chained, signed by this host's key)."""


@audit.command("tail")
@click.option("-n", "count", default=20, show_default=True, type=click.IntRange(0, 100000))
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records (Ctrl-C stops).")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
@fail_on_errors
def tail(count: int, follow: bool, as_json: bool) -> None:
    """Show the newest records of this tenant's log."""
    log = _log()

    def show(rec: dict[str, Any]) -> None:
        click.echo(json.dumps(rec, sort_keys=True) if as_json else escape(_line(rec)))

    for rec in log.tail(count):
        show(rec)
    if follow:
        try:
            for rec in log.follow():
                show(rec)
        except KeyboardInterrupt:
            return


@audit.command("show")
@click.argument("ident")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@fail_on_errors
def show(ident: str, as_json: bool) -> None:
    """Show one record by audit id (or id prefix, or sequence number)."""
    rec = _log().find(ident)
    if rec is None:
        raise AuditError(
            f"no audit record {ident!r}",
            hint="list ids with `mvmctl audit tail`; MVM_TENANT picks the log",
            ident=ident,
        )
    if as_json:
        click.echo(json.dumps(rec, sort_keys=True))
        return
    for k in ("id", "seq", "time", "tenant", "actor", "event", "sandbox", "prev", "key"):
        click.echo(f"{k:<8} {escape(str(rec.get(k)))}")
    data = rec.get("data")
    if isinstance(data, dict):
        for k, v in sorted(data.items()):
            click.echo(f"  {escape(k)}: {escape(json.dumps(v))}")


@audit.command("verify")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Verify this log file (default: this tenant's log).",
)
@click.option(
    "--pubkey",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Public key file (default: host.pub in the audit dir).",
)
@click.option(
    "--checkpoint",
    "cp_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file from `mvmctl audit checkpoint`: also detect dropped newest records.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@fail_on_errors
def verify(path: Path | None, pubkey: Path | None, cp_path: Path | None, as_json: bool) -> None:
    """Check every signature, the hash chain and the sequence; name the first bad record.

    With --checkpoint, also check the log still reaches the checkpoint's head with the
    same record there (a log cut short at the end verifies on its own).
    Exit 0 when intact, 1 when a record was edited, removed, reordered or truncated.
    """
    path = path or audit_mod.default_path()
    pub = _pubkey(pubkey) if pubkey else keys.load_public(path.parent)
    if cp_path is not None:
        rep = cpmod.verify_file(path, cpmod.load(cp_path), pub)
    else:
        rep = audit_mod.verify_file(path, pub)
    if as_json:
        click.echo(json.dumps(rep.to_json()))
    elif rep.ok:
        anchored = " (reaches the checkpoint)" if cp_path is not None else ""
        click.echo(f"ok: {rep.records} records, head seq {rep.head_seq} {rep.head_hash}{anchored}")
    else:
        bad = rep.first_bad
        assert bad is not None
        err_console.print(
            f"[bold red]audit log damaged:[/] line {bad.line} (seq {bad.seq}, id {bad.id}): "
            f"{bad.reason}: {escape(bad.detail)}"
        )
        if len(rep.problems) > 1:
            err_console.print(f"{len(rep.problems) - 1} more problem(s); see --json")
    sys.exit(0 if rep.ok else 1)


@audit.command("checkpoint")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the checkpoint to this file (default: print it).",
)
@fail_on_errors
def checkpoint(out: Path | None) -> None:
    """Sign the log's current head (seq, hash, time, key) with the host key.

    Keep the file away from this host (it is what a rewritten log cannot match); later
    `mvmctl audit verify --checkpoint FILE` detects records dropped after it.
    """
    cp = cpmod.make(_log())
    if out is None:
        click.echo(json.dumps(cp, indent=2, sort_keys=True))
        return
    try:
        cpmod.write(out, cp)
    except OSError as e:
        raise AuditError(
            f"cannot write the checkpoint {out}: {e.strerror}", hint="check the path"
        ) from e
    click.echo(f"checkpoint: seq {cp['seq']} {cp['hash']} at {cp['time']} -> {out}")


@click.group("receipt")
def receipt_group() -> None:
    """Check receipts written by `mvmctl run --receipt FILE`."""


@receipt_group.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--pubkey",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Public key file (default: this host's host.pub).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@fail_on_errors
def receipt_verify(file: Path, pubkey: Path | None, as_json: bool) -> None:
    """Check a receipt's signature against the host audit key. Exit 1 if it fails."""
    res = receipt.verify(receipt.load(file), _pubkey(pubkey))
    if as_json:
        click.echo(json.dumps(res.__dict__))
    elif res.ok:
        click.echo(f"ok: {res.reason}; exit_code {res.exit_code}, audit_id {res.audit_id}")
    else:
        err_console.print(f"[bold red]receipt invalid:[/] {escape(res.reason)}")
    sys.exit(0 if res.ok else 1)


COMMANDS = [audit, receipt_group]


def write_run_receipt(
    path: Path, argv: list[str], env_keys: list[str], result: Any, policy: dict[str, Any]
) -> None:
    """``run --receipt FILE``: sign what ran (hashes only) with the host audit key."""
    from mvm.audit import runs
    from mvm.images.store import ImageStore

    img = ImageStore().find(result.image)
    rec = runs.make_receipt(
        argv=argv,
        env_keys=env_keys,
        image={
            "name": result.image,
            "id": result.image_id,
            "rootfs_sha256": img.rootfs_sha256 if img and img.id == result.image_id else None,
        },
        policy=policy,
        exit_code=result.exit_code,
        stdout=result.stdout,
        stderr=result.stderr,
        timings={
            "started_at": result.started_at,
            "finished_at": result.finished_at,
            "boot_seconds": round(result.boot_seconds, 6),
            "duration": round(result.duration, 6),
            "timed_out": result.timed_out,
        },
        audit_id=result.audit_id,
        sandbox_id=result.sandbox_id,
    )
    try:
        receipt.write(path, rec)
    except OSError as e:
        raise AuditError(
            f"cannot write the receipt {path}: {e.strerror}", hint="check the path", path=str(path)
        ) from e
