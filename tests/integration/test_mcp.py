"""``mvmctl mcp`` driven by the official ``mcp`` client over stdio, against real VMs.

The client spawns ``python -m mvm.cli.main mcp`` with a private ``MVM_HOME``, lists the
tools, runs code (which makes the session's default sandbox), writes and reads a file,
sends malformed calls (MCP errors, and the server keeps serving), and after the session
the sandbox it made is gone while one made with ``persist`` stays. Audit records name the
client and the tools, never argument values.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

import mvm
from mvm.errors import SandboxNotFound
from tests.integration.code_home import home_fixture

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

TOOLS = {
    "sandbox_create",
    "sandbox_list",
    "sandbox_kill",
    "run_code",
    "run_command",
    "write_file",
    "read_file",
    "list_files",
    "sandbox_expose_port",
    "browser_screenshot",
    "desktop_screenshot",
    "desktop_click",
    "desktop_type",
}
MARK = "mcp-arg-" + os.urandom(4).hex()  # an argument value that must not reach the audit log


home = home_fixture("mvmcp-")


def texts(res: Any) -> str:
    return "\n".join(c.text for c in res.content if c.type == "text")


@contextlib.asynccontextmanager
async def mcp_session(home: Path, client: str) -> AsyncIterator[ClientSession]:
    """``mvmctl mcp`` over stdio in ``home``, as an MCP client named ``client``."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mvm.cli.main", "mcp"],
        env={**os.environ, "MVM_HOME": str(home)},
    )
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, client_info=types.Implementation(name=client, version="1")) as s,
    ):
        await s.initialize()
        yield s


async def session_run(home: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    async with mcp_session(home, "mvm-test-agent") as s:
        listed = await s.list_tools()
        seen["tools"] = {t.name: t for t in listed.tools}

        first = await s.call_tool("run_code", {"code": f"x = 6 * 7\nprint('{MARK}')\nx"})
        seen["first"] = first
        second = await s.call_tool("run_code", {"code": "x + 1"})
        seen["second"] = second
        png_cell = (
            "import struct, zlib\n"
            "c = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))\n"
            "class P:\n"
            "    def _repr_png_(self):\n"
            "        head = struct.pack('>IIBBBBB', 1, 1, 8, 2, 0, 0, 0)\n"
            "        return (b'\\x89PNG\\r\\n\\x1a\\n' + c(b'IHDR', head)\n"
            "                + c(b'IDAT', zlib.compress(b'\\x00\\x01\\x02\\x03')) + c(b'IEND', b''))\n"
            "P()"
        )
        seen["image"] = await s.call_tool("run_code", {"code": png_cell})
        await s.call_tool("write_file", {"path": "/work/note.txt", "content": MARK})
        seen["read"] = await s.call_tool("read_file", {"path": "/work/note.txt"})
        seen["ls"] = await s.call_tool("list_files", {"path": "/work"})
        seen["cmd"] = await s.call_tool("run_command", {"command": "cat /work/note.txt; exit 3"})
        seen["bad_type"] = await s.call_tool("run_code", {"code": 5})
        seen["bad_path"] = await s.call_tool("read_file", {"path": "relative.txt"})
        seen["bad_name"] = await s.call_tool("sandbox_kill", {"sandbox": "../../etc"})
        seen["missing"] = await s.call_tool("read_file", {"path": "/work/none"})
        seen["kept"] = await s.call_tool(
            "sandbox_create", {"name": "mcp-kept", "persist": True, "ttl": "10m"}
        )
        listing = await s.call_tool("sandbox_list", {})
        seen["list"] = json.loads(texts(listing))
        seen["after_errors"] = await s.call_tool("run_code", {"code": "x"})
    return seen


def test_mcp_session(home: Path) -> None:
    seen = asyncio.run(asyncio.wait_for(session_run(home), 800))
    assert set(seen["tools"]) == TOOLS
    assert all(t.description for t in seen["tools"].values())

    first = seen["first"]
    assert not first.is_error and "42" in texts(first) and MARK in texts(first)
    assert "43" in texts(seen["second"])  # the interpreter kept x
    images = [c for c in seen["image"].content if c.type == "image"]
    assert len(images) == 1 and images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(b"\x89PNG\r\n\x1a\n")

    assert texts(seen["read"]) == MARK
    assert '"note.txt"' in texts(seen["ls"])
    assert "exit_code: 3" in texts(seen["cmd"]) and MARK in texts(seen["cmd"])
    for key in ("bad_type", "bad_path", "bad_name", "missing"):
        assert seen[key].is_error, key
    assert "invalid sandbox name" in texts(seen["bad_name"])
    assert "43" not in texts(seen["after_errors"]) and "42" in texts(seen["after_errors"])

    made = [row for row in seen["list"] if row["made_by_this_session"]]
    assert {r["name"] for r in made} >= {"mcp-kept"} and len(made) == 2
    default = next(r["name"] for r in made if r["name"] != "mcp-kept")

    # The session ended: its default sandbox is gone, the persisted one stays.
    names = {i.name for i in mvm.Sandbox.list()}
    assert default not in names
    assert "mcp-kept" in names
    try:
        mvm.Sandbox.connect("mcp-kept").kill()
    except SandboxNotFound:
        pass

    log = (home / "audit" / "default.jsonl").read_text()
    # mvmd records every tool call (mcp.call, even a failing one) and what the tools did,
    # with the MCP client as actor; mcp writes no record itself.
    records = [json.loads(line) for line in log.splitlines()]
    # (the module's other MCP session, mvm-test-eyes, may have run first in this home)
    assert {r["actor"] for r in records if r["actor"].startswith("mcp:")} <= {
        "mcp:mvm-test-agent",
        "mcp:mvm-test-eyes",
    }
    by_mcp = [r for r in records if r["actor"] == "mcp:mvm-test-agent"]
    assert {"sandbox.launched", "fs.write", "cmd.exec.started"} <= {r["event"] for r in by_mcp}
    calls = [r["data"]["call"] for r in by_mcp if r["event"] == "mcp.call"]
    assert {"sandbox_create", "run_code", "read_file", "list_files", "run_command"} <= set(calls)
    assert calls.count("read_file") >= 2  # the read, and the missing file: failures count too
    assert not [r for r in records if r["event"] == "mcp.tool"]
    assert MARK not in log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mcp_http_needs_the_token(home: Path) -> None:
    port, token = free_port(), "tok-" + os.urandom(8).hex()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvm.cli.main", "mcp", "--http", f"127.0.0.1:{port}"],
        env={**os.environ, "MVM_HOME": str(home), "MVM_MCP_TOKEN": token},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 60
        while True:  # bounded wait for the listener
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "no listener"
                time.sleep(0.2)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            req = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=10)
            assert exc.value.code == 401

        async def list_tools() -> set[str]:
            client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
            async with (
                client,
                streamable_http_client(url, http_client=client) as (read, write, *_),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                return {t.name for t in (await s.list_tools()).tools}

        assert asyncio.run(asyncio.wait_for(list_tools(), 60)) == TOOLS
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert token not in (proc.stderr.read().decode() if proc.stderr else "")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


async def visual_run(home: Path) -> dict[str, Any]:
    """A desktop and a browser sandbox made and driven through the MCP tools only."""
    seen: dict[str, Any] = {}
    async with mcp_session(home, "mvm-test-eyes") as s:
        seen["desk"] = await s.call_tool("sandbox_create", {"image": "desktop", "name": "mcp-desk"})
        seen["before"] = await s.call_tool("desktop_screenshot", {"sandbox": "mcp-desk"})
        seen["click"] = await s.call_tool(
            "desktop_click", {"sandbox": "mcp-desk", "x": 20, "y": 20, "button": "left"}
        )
        seen["off"] = await s.call_tool(
            "desktop_click", {"sandbox": "mcp-desk", "x": 5000, "y": 20}
        )
        seen["type"] = await s.call_tool(
            "desktop_type", {"sandbox": "mcp-desk", "text": "hello mcp", "press_enter": True}
        )
        seen["after"] = await s.call_tool("desktop_screenshot", {"sandbox": "mcp-desk"})
        seen["web"] = await s.call_tool("sandbox_create", {"image": "browser", "name": "mcp-web"})
        seen["shot"] = await s.call_tool("browser_screenshot", {"sandbox": "mcp-web"})
        seen["not_desktop"] = await s.call_tool("desktop_screenshot", {"sandbox": "mcp-web"})
    return seen


def test_mcp_drives_a_desktop_and_a_browser(home: Path) -> None:
    seen = asyncio.run(asyncio.wait_for(visual_run(home), 800))
    for key in ("desk", "before", "click", "type", "after", "web", "shot"):
        assert not seen[key].is_error, (key, texts(seen[key]))
    shots = {}
    for key in ("before", "after", "shot"):
        images = [c for c in seen[key].content if c.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png", key
        shots[key] = base64.b64decode(images[0].data)
    assert png_size(shots["before"]) == png_size(shots["after"]) == (1024, 768)
    assert png_size(shots["shot"])[0] > 0
    assert seen["off"].is_error and "off the 1024x768 screen" in texts(seen["off"])
    assert seen["not_desktop"].is_error  # a browser sandbox has no X display to shoot
    # The session made both sandboxes: they are gone with it.
    names = {i.name for i in mvm.Sandbox.list()}
    assert not {"mcp-desk", "mcp-web"} & names
    calls = [
        json.loads(line)
        for line in (home / "audit" / "default.jsonl").read_text().splitlines()
        if '"mcp.call"' in line
    ]
    made = {r["data"]["call"] for r in calls if r["actor"] == "mcp:mvm-test-eyes"}
    assert {"desktop_screenshot", "desktop_click", "desktop_type", "browser_screenshot"} <= made
