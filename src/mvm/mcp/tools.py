"""The MCP tools: a thin adapter from tool calls to the Python SDK (``mvm.Sandbox`` through
mvmd, so admission, secrets, redaction and audit apply as for any client).

``Session`` holds what one MCP session made: sandboxes it created (removed when it ends
unless created with ``persist``) and its default sandbox, which ``run_code`` and friends
create on first use when no sandbox is named. Results are rendered for a model: text with
long parts truncated (with a note saying so), images as MCP image content.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import mvm
from mvm import names
from mvm.errors import InvalidArgument, MvmError, SandboxNotFound
from mvm.sdk.code import CodeResult

#: Longest text one part of a tool result carries; the rest is cut with a note.
MAX_TEXT = 32 * 1024
#: Largest file read_file returns (text or image); larger ones are refused.
MAX_READ = 4 * 1024 * 1024
#: Largest write_file content.
MAX_WRITE = 8 * 1024 * 1024
MAX_TIMEOUT = 3600.0
IMAGE_MIMES = ("image/png", "image/jpeg")


def clip(text: str, what: str = "output", limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + (
        f"\n[mvm: {what} truncated: {len(text) - limit} more characters not shown; write it "
        "to a file in the sandbox and read parts of it if you need them]"
    )


@dataclass
class Part:
    """One piece of a tool result: text, or an image (bytes + MIME type)."""

    text: str | None = None
    image: bytes | None = None
    mime: str = "image/png"


@dataclass
class Session:
    image: str = "python"
    persist: bool = False
    made: dict[str, bool] = field(default_factory=dict)  # name -> keep after the session
    default: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    default_lock: threading.Lock = field(default_factory=threading.Lock)
    sandboxes: dict[str, mvm.Sandbox] = field(default_factory=dict)

    # -- sandboxes ----------------------------------------------------------------------
    def create(
        self,
        image: str | None,
        name: str | None,
        ttl: str,
        cpu_cores: int,
        memory_mb: int,
        network_allow: list[str],
        persist: bool,
    ) -> mvm.Sandbox:
        img = names.check("image", image or self.image)
        if name is not None:
            names.check("sandbox", name)
        net = mvm.network(mode="allow", allow=network_allow) if network_allow else None
        sb = mvm.Sandbox.create(
            img,
            name=name,
            ttl=ttl,
            resources=mvm.resources(cpu_cores=cpu_cores, memory_mb=memory_mb),
            network=net,
            tags={"made-by": "mcp"},
        )
        with self.lock:
            self.made[sb.name] = persist or self.persist
            self.sandboxes[sb.name] = sb
        return sb

    def get(self, name: str | None) -> mvm.Sandbox:
        """The named sandbox, or the session's default one (created on first use)."""
        with self.lock:
            if name is None and self.default is not None:
                name = self.default
            if name is not None and name in self.sandboxes:
                return self.sandboxes[name]
        if name is None:
            with self.default_lock:  # concurrent first calls make one default sandbox
                if self.default is not None:
                    return self.get(self.default)
                sb = self.create(None, None, "30m", 1, 1024, [], False)
                with self.lock:
                    self.default = sb.name
            return sb
        sb = mvm.Sandbox.connect(names.check("sandbox", name))
        with self.lock:
            self.sandboxes[name] = sb
        return sb

    def kill(self, name: str) -> None:
        names.check("sandbox", name)
        sb = self.sandboxes.get(name) or mvm.Sandbox.connect(name)
        sb.kill()
        with self.lock:
            self.sandboxes.pop(name, None)
            self.made.pop(name, None)
            if self.default == name:
                self.default = None

    def close(self) -> list[str]:
        """Remove what this session made (not the persisted ones); return their names."""
        with self.lock:
            doomed = [n for n, keep in self.made.items() if not keep]
        gone = []
        for n in doomed:
            try:
                self.kill(n)
                gone.append(n)
            except SandboxNotFound:
                gone.append(n)
            except MvmError:
                pass
        return gone


def info_dict(info: Any, session: Session) -> dict[str, Any]:
    return {
        "name": info.name,
        "image": info.image,
        "state": info.state,
        "cpus": info.cpus,
        "memory_mb": info.memory_mb,
        "ttl_left_seconds": round(info.ttl_left),
        "made_by_this_session": info.name in session.made,
        "persist": session.made.get(info.name, False),
        "forwards": [f"http://{f.host}:{f.host_port}/ -> {f.guest_port}" for f in info.forwards],
    }


def check_timeout(timeout_seconds: float) -> float:
    if not 0 < timeout_seconds <= MAX_TIMEOUT:
        raise InvalidArgument(f"timeout_seconds must be in (0, {MAX_TIMEOUT:g}]")
    return float(timeout_seconds)


def render_code(res: CodeResult, sandbox: str) -> list[Part]:
    lines = [f"sandbox: {sandbox}  context: {res.context}  status: {res.status}"]
    if res.stdout:
        lines.append("stdout:\n" + clip(res.stdout, "stdout"))
    if res.stderr:
        lines.append("stderr:\n" + clip(res.stderr, "stderr"))
    if res.text is not None:
        lines.append("result:\n" + clip(res.text, "result"))
    if res.error is not None:
        tb = res.error.traceback or f"{res.error.name}: {res.error.value}"
        lines.append("error:\n" + clip(tb, "traceback"))
    if res.timed_out:
        lines.append(
            "the cell ran past its timeout and was interrupted"
            + ("; it did not stop, so its context was killed (state lost)" if res.killed else "")
        )
    if res.truncated:
        lines.append("[mvm: the cell's output was truncated in the sandbox]")
    parts = [Part(text="\n".join(lines))]
    for out in res.outputs:
        for mime in IMAGE_MIMES:
            data = out.get(mime)
            if isinstance(data, bytes):
                parts.append(Part(image=data, mime=mime))
                break
        else:
            for mime in ("text/html", "application/json", "text/markdown", "image/svg+xml"):
                v = out.get(mime)
                if isinstance(v, str):
                    parts.append(Part(text=f"[{mime}]\n" + clip(v, mime)))
                    break
    return parts


def run_command(sb: mvm.Sandbox, command: str, timeout: float, cwd: str | None) -> list[Part]:
    try:
        res = sb.commands.run(command, timeout_seconds=timeout, cwd=cwd)
        note = ""
    except mvm.errors.CommandTimeout as exc:
        res = exc.result  # type: ignore[attr-defined]
        note = f"\n[mvm: the command ran past {timeout:g}s and was killed]"
    text = f"sandbox: {sb.name}  exit_code: {res.exit_code}{note}"
    if res.stdout:
        text += "\nstdout:\n" + clip(res.stdout, "stdout")
    if res.stderr:
        text += "\nstderr:\n" + clip(res.stderr, "stderr")
    if res.truncated:
        text += "\n[mvm: output was truncated in the sandbox]"
    return [Part(text=text)]


def read_file(sb: mvm.Sandbox, path: str) -> list[Part]:
    st = sb.files.stat(path)
    if st.size > MAX_READ:
        raise InvalidArgument(
            f"{path} is {st.size} bytes; read_file returns at most {MAX_READ}",
            hint="use run_command (head, tail, grep) to read parts of it",
        )
    data = sb.files.read(path)[:MAX_READ]
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return [Part(text=f"{path}: PNG image, {len(data)} bytes"), Part(image=data)]
    if data.startswith(b"\xff\xd8\xff"):
        return [
            Part(text=f"{path}: JPEG image, {len(data)} bytes"),
            Part(image=data, mime="image/jpeg"),
        ]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        b64 = base64.b64encode(data[:MAX_TEXT]).decode()
        return [
            Part(
                text=f"{path}: binary, {len(data)} bytes; base64 of the first "
                f"{min(len(data), MAX_TEXT)} bytes:\n{b64}"
            )
        ]
    return [Part(text=clip(text, f"{path}"))]


def write_file(sb: mvm.Sandbox, path: str, content: str, is_base64: bool) -> list[Part]:
    if len(content) > MAX_WRITE * 2:
        raise InvalidArgument(f"content is at most {MAX_WRITE} bytes")
    if is_base64:
        try:
            data = base64.b64decode(content, validate=True)
        except ValueError:
            raise InvalidArgument("content is not valid base64") from None
    else:
        data = content.encode()
    if len(data) > MAX_WRITE:
        raise InvalidArgument(f"content is at most {MAX_WRITE} bytes")
    sb.files.write(path, data)
    return [Part(text=f"wrote {len(data)} bytes to {path} in sandbox {sb.name}")]


def list_files(sb: mvm.Sandbox, path: str) -> list[Part]:
    entries = sb.files.list(path)
    rows = [{"name": e.name, "type": e.type, "size": e.size} for e in entries[:1000]]
    text = json.dumps(rows, indent=1)
    if len(entries) > 1000:
        text += f"\n[mvm: {len(entries) - 1000} more entries not shown]"
    return [Part(text=clip(text, "listing"))]


def expose_port(sb: mvm.Sandbox, port: int) -> list[Part]:
    fwd = sb.ports.forward(guest_port=port)
    url = f"http://127.0.0.1:{fwd.host_port}/"
    return [
        Part(
            text=f"{url}\n(guest port {port} of sandbox {sb.name}, on this host's loopback "
            f"only; forward id {fwd.id})"
        )
    ]


# -- browser and desktop sandboxes (sandboxes of the browser / desktop images) -------------
CLICKS = ("left", "right", "middle", "double")


def browser_screenshot(name: str, url: str | None, full_page: bool) -> list[Part]:
    sb = mvm.BrowserSandbox.connect(names.check("sandbox", name))
    assert isinstance(sb, mvm.BrowserSandbox)
    png = sb.screenshot(url, full_page=full_page)
    return [Part(image=png), Part(text=f"screenshot of {url or 'a blank tab'} in {name}")]


def _desktop(name: str) -> mvm.DesktopSandbox:
    sb = mvm.DesktopSandbox.connect(names.check("sandbox", name))
    assert isinstance(sb, mvm.DesktopSandbox)
    return sb


def desktop_screenshot(name: str) -> list[Part]:
    sb = _desktop(name)
    w, h = sb.get_screen_size()
    return [Part(image=sb.screenshot()), Part(text=f"the {w}x{h} screen of {name}")]


def desktop_click(name: str, x: int, y: int, button: str) -> list[Part]:
    if button not in CLICKS:
        raise InvalidArgument(f"button is one of {', '.join(CLICKS)}, not {button!r}")
    sb = _desktop(name)
    click = {
        "left": sb.left_click,
        "right": sb.right_click,
        "middle": sb.middle_click,
        "double": sb.double_click,
    }[button]
    click(x, y)
    return [Part(text=f"{button} click at ({x}, {y}) in {name}")]


def desktop_type(name: str, text: str, press_enter: bool) -> list[Part]:
    sb = _desktop(name)
    sb.write(text)
    if press_enter:
        sb.press("Return")
    return [
        Part(text=f"typed {len(text)} characters in {name}" + (" and Enter" if press_enter else ""))
    ]
