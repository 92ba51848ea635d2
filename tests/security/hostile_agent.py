"""An attacker's guest agent: root inside the VM, speaking to the host over the real port.

This file is not imported on the host. ``tests/security/hostile.py`` builds an initramfs
whose ``agent.py`` is ``REAL_AGENT_SOURCE = '<the shipped agent>'`` followed by this
file, so the attacker starts from the real agent (as a real attacker would: it is in
every guest) and behaves honestly until told to attack. Only the guest's standard
library is used.

Attacks are chosen per request, so one VM serves many scenarios:

- ``exec ["attack", MODE, ...]`` runs MODE instead of a command (see ``ATTACKS``);
- ``fs.list`` of a path under ``/attack`` answers with poisoned entry names;
- ``mvm.hostile=nonce`` on the kernel command line (or the ``nonce`` attack) makes every
  hello answer a wrong nonce and every hello is followed by fake ``ready`` frames,
  until a ``ping`` with ``{"reset": true}`` arrives.
"""

import json
import os
import struct
import sys
import time
import types
from typing import Any

_real = types.ModuleType("mvm_real_agent")
_real.__dict__["__file__"] = os.path.abspath(__file__)
sys.modules[_real.__name__] = _real  # dataclasses and pickling look modules up by name
exec(compile(globals()["REAL_AGENT_SOURCE"], "agent.py", "exec"), _real.__dict__)
P: Any = _real.__dict__["P"]
RealAgent: Any = _real.__dict__["Agent"]

MIB = 1024 * 1024


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"hostile: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


def cmdline_mode() -> str:
    try:
        with open("/proc/cmdline") as f:
            for arg in f.read().split():
                if arg.startswith("mvm.hostile="):
                    return arg.split("=", 1)[1]
    except OSError:
        pass
    return ""


def raw_frame(header: bytes, payload: bytes = b"") -> bytes:
    """A frame from raw header bytes (which need not be valid JSON)."""
    return (
        P.MAGIC + struct.pack(">II", 4 + len(header) + len(payload), len(header)) + header + payload
    )


class Hostile(RealAgent):  # type: ignore[misc]
    def __init__(self, channel: Any) -> None:
        super().__init__(channel)
        self.bad_nonce = cmdline_mode() == "nonce"
        log(f"hostile agent up (bad nonce: {self.bad_nonce})")

    def raw(self, data: bytes) -> None:
        """Write bytes to the port, whole, under the channel lock."""
        view = memoryview(data)
        with self.ch.lock:
            while view:
                try:
                    n = os.write(self.ch.fd, view)
                except InterruptedError:
                    continue
                view = view[n:]

    def handle(self, frame: Any) -> None:
        h = frame.header
        if frame.type == P.HELLO and self.bad_nonce:
            self.ch.send({"t": P.READY, "id": 0, "version": P.PROTOCOL_VERSION})
            self.ch.send({"t": P.READY, "id": frame.id, "version": P.PROTOCOL_VERSION})
            self.ch.send(
                {"t": P.OK, "id": frame.id, "version": P.PROTOCOL_VERSION, "nonce": "f" * 16}
            )
            return
        if frame.type == P.PING and h.get("reset") is True:
            self.bad_nonce = False
        argv = h.get("argv")
        if frame.type == P.EXEC and isinstance(argv, list) and argv[:1] == ["attack"]:
            mode = str(argv[1]) if len(argv) > 1 else ""
            attack = ATTACKS.get(mode)
            if attack is None:
                self.ch.send({"t": P.ERR, "id": frame.id, "code": "bad_request", "message": mode})
                return
            log(f"attack {mode}")
            attack(self, frame.id, argv[2:])
            return
        if frame.type == P.FS_LIST and str(h.get("path", "")).startswith("/attack"):
            self.poisoned_list(frame.id, str(h["path"]))
            return
        super().handle(frame)

    # -- attacks ------------------------------------------------------------------------
    def oversize(self, rid: int, args: list[str]) -> None:
        """A length prefix of almost 4 GiB, then a little data: the host must not wait for
        (or allocate) the rest."""
        self.raw(P.MAGIC + struct.pack(">II", 0xFFFFFFF0, 16) + b"A" * 64)

    def badjson(self, rid: int, args: list[str]) -> None:
        self.raw(raw_frame(b'{"t": "ok", "id": ' + str(rid).encode() + b", oops"))

    def badid(self, rid: int, args: list[str]) -> None:
        self.raw(raw_frame(b'{"t":"ok","id":-7}'))

    def unasked(self, rid: int, args: list[str]) -> None:
        """Replies to ids nobody asked for, fake ready/hello frames, guest-sent requests
        and malformed events, with big payloads; then the honest reply."""
        count = int(args[0]) if args else 256
        junk = b"J" * P.MAX_PAYLOAD
        for i in range(count):
            other = rid + 1_000_000 + i
            self.ch.send({"t": P.OUT, "id": other, "stream": "stdout"}, junk)
            self.ch.send({"t": P.OK, "id": other, "exit_code": 0})
            self.ch.send({"t": P.READY, "id": 0, "version": 99})
            self.ch.send({"t": P.HELLO, "id": rid, "nonce": "x"})
            self.ch.send({"t": P.EVENT, "id": 0, "kind": "proc.exit", "proc": [1] * 100})
            self.ch.send({"t": P.EVENT, "id": 0, "kind": "proc.output", "stream": None}, junk)
        log(f"sent {count} MiB of unasked-for frames")
        self.ch.send({"t": P.OK, "id": rid, "exit_code": 0, "timed_out": False, "duration": 0.0})

    def endless(self, rid: int, args: list[str]) -> None:
        """Output for an exec that never ends, as fast as the port takes it (for
        ``args[0]`` seconds if given, so a later attack can still be sent)."""
        chunk = b"E" * P.CHUNK
        sent = 0
        until = time.monotonic() + float(args[0]) if args else float("inf")
        self.ch.send({"t": P.STARTED, "id": rid, "pid": 4242})
        while time.monotonic() < until:
            self.ch.send({"t": P.OUT, "id": rid, "stream": "stdout"}, chunk)
            sent += len(chunk)
            if sent % (64 * MIB) == 0:
                log(f"endless: sent {sent // MIB} MiB")

    def slowloris(self, rid: int, args: list[str]) -> None:
        """The reply trickled one byte per second."""
        data = P.encode({"t": P.OK, "id": rid, "exit_code": 0})
        with self.ch.lock:
            for i in range(len(data)):
                os.write(self.ch.fd, data[i : i + 1])
                time.sleep(1.0)

    def nonce(self, rid: int, args: list[str]) -> None:
        self.bad_nonce = True
        self.ch.send({"t": P.OK, "id": rid, "exit_code": 0})

    def wrongtype(self, rid: int, args: list[str]) -> None:
        """A well-framed exec result whose fields have the wrong types."""
        self.ch.send({"t": P.OK, "id": rid, "exit_code": "zero", "truncated": [1]})

    def poisoned_list(self, rid: int, path: str) -> None:
        name = path.rsplit("/", 1)[-1]
        bad = {
            "dotdot": "../../../../etc/passwd",
            "nul": "innocent\x00.txt",
            "slash": "a/b",
            "dot": "..",
            "escape": "\x1b]0;pwned\x07\x1b[2J",
            "long": "x" * 5000,
        }.get(name, "..")
        entry = {"name": bad, "type": "file", "size": 1, "mode": 0o644, "mtime": 0.0}
        body = json.dumps({"t": P.OK, "id": rid, "entries": [entry]}).encode()
        self.raw(raw_frame(body))


ATTACKS = {
    "oversize": Hostile.oversize,
    "badjson": Hostile.badjson,
    "badid": Hostile.badid,
    "unasked": Hostile.unasked,
    "endless": Hostile.endless,
    "slowloris": Hostile.slowloris,
    "nonce": Hostile.nonce,
    "wrongtype": Hostile.wrongtype,
}

_real.__dict__["Agent"] = Hostile  # serve_forever() builds the agent by this name

if __name__ == "__main__":
    if os.getpid() == 1:
        _real.__dict__["init_main"]()
    else:
        _real.__dict__["serve_forever"]()
