"""``mvm.DesktopSandbox``: an X desktop in a microVM for computer-use agents (e2b-desktop verbs).

The ``desktop`` image's warm recipe (``mvm.warm``, presets/desktop.toml) keeps Xvfb (:0),
openbox, x11vnc (guest loopback 5900) and websockify/noVNC (guest loopback 6080) running,
so a new sandbox answers a screenshot at once. Input goes through ``xdotool`` and
screenshots through ``scrot`` (an audited exec writing a temporary file that is read back
and removed: the image never enters the audit log). The viewer is off until
``stream.start()``: that writes a fresh VNC password (re-read by x11vnc on every
connection) and forwards 127.0.0.1:PORT to noVNC. Coordinates are checked against the screen size; text and key names are validated.
"""

from __future__ import annotations

import re
import secrets
import string
from pathlib import Path
from typing import Any

from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError
from mvm.sdk.options import EnvValue, Resources, network
from mvm.sdk.options import resources as make_resources
from mvm.sdk.sandbox import DEFAULT_TTL, Sandbox, build_spec
from mvm.sdk.threads import to_thread

DISPLAY = ":0"
VNC_PORT, NOVNC_PORT = 5900, 6080
PASSWORD_FILE = "/home/user/.mvm-desktop/vncpass"
#: The template's screen (presets/desktop.toml); another size is set through RandR at
#: create, from MIN_RESOLUTION up to the framebuffer Xvfb was started with.
DEFAULT_RESOLUTION = (1024, 768)
MIN_RESOLUTION = (320, 240)
MAX_RESOLUTION = (1920, 1200)
#: Largest clipboard text read or written (the audit log keeps its hash and size).
MAX_CLIPBOARD = 1 << 20
DEFAULT_MEMORY_MB = 1024
MAX_TEXT = 4096
MAX_SCREENSHOT = 16 << 20
SHOT_DIR = "/tmp"  # in the writable layer; each file is removed after the read
KEY_RE = re.compile(r"^[A-Za-z0-9_]{1,32}(\+[A-Za-z0-9_]{1,32}){0,4}$")
BUTTONS = {"left": 1, "middle": 2, "right": 3}
SCROLL = {"up": 4, "down": 5, "left": 6, "right": 7}
TITLE_RE = re.compile(r"^[A-Za-z0-9._ -]{1,64}$")
URL_RE = re.compile(r"^(https?|file)://[^\s\0]{1,4000}$")


class DesktopError(MvmError):
    """An input or screen operation failed in the guest."""


def check_text(text: str) -> str:
    if not isinstance(text, str) or not 0 < len(text) <= MAX_TEXT:
        raise InvalidArgument(f"text must be a str of 1 to {MAX_TEXT} characters")
    if any(not c.isprintable() and c not in "\n\t" for c in text):
        raise InvalidArgument("text may hold printable characters, newlines and tabs only")
    return text


def check_keys(keys: str | list[str]) -> list[str]:
    items = [keys] if isinstance(keys, str) else list(keys)
    if not 0 < len(items) <= 16:
        raise InvalidArgument("press takes 1 to 16 keys")
    for k in items:
        if not isinstance(k, str) or not KEY_RE.match(k):
            raise InvalidArgument(
                f"invalid key {k!r}", hint="X keysym names such as Return, ctrl+c, alt+Tab, F5"
            )
    return items


def check_resolution(resolution: Any) -> tuple[int, int]:
    """``(width, height)`` within MIN_RESOLUTION..MAX_RESOLUTION, or InvalidArgument."""
    try:
        w, h = resolution
    except (TypeError, ValueError):
        raise InvalidArgument("resolution is a (width, height) pair") from None
    lo, hi = MIN_RESOLUTION, MAX_RESOLUTION
    for v, a, b, what in ((w, lo[0], hi[0], "width"), (h, lo[1], hi[1], "height")):
        if isinstance(v, bool) or not isinstance(v, int) or not a <= v <= b:
            raise InvalidArgument(
                f"resolution {what} {v!r} is outside {a}..{b}",
                hint=f"from {lo[0]}x{lo[1]} up to {hi[0]}x{hi[1]}",
            )
    return w, h


def resolution_script(w: int, h: int) -> list[str]:
    """The guest command that makes the screen ``w``x``h``: a RandR mode of that size on
    Xvfb's one output (its framebuffer is MAX_RESOLUTION, so any smaller size fits)."""
    mode = f"mvm-{w}x{h}"
    clock = f"{w * h * 60 / 1e6:.2f}"  # a nominal 60 Hz: Xvfb has no real timings
    return [
        "sh",
        "-c",
        f"xrandr --newmode {mode} {clock} {w} {w} {w} {w} {h} {h} {h} {h} 2>/dev/null; "
        f"xrandr --addmode screen {mode} 2>/dev/null; xrandr --output screen --mode {mode}",
    ]


class Clipboard:
    """The X clipboard (CLIPBOARD selection): sensitive, so it moves only through these
    explicit calls, each an audited exec (the audit log keeps hash and size, never text)."""

    def __init__(self, sandbox: DesktopSandbox) -> None:
        self._sb = sandbox

    def read(self) -> str:
        """The clipboard's text ("" when nothing holds it); at most MAX_CLIPBOARD bytes."""
        r = self._sb.commands.run(
            ["sh", "-c", "xclip -selection clipboard -o 2>/dev/null || true"],
            env={"DISPLAY": DISPLAY},
            output_limit=MAX_CLIPBOARD,
            timeout_seconds=60,
        )
        if r.truncated:
            raise DesktopError(f"the clipboard holds more than {MAX_CLIPBOARD} bytes")
        return r.stdout_bytes.decode(errors="replace")

    def write(self, text: str) -> None:
        """Put ``text`` on the clipboard (it comes in on stdin: never in an argv). Returns
        once the guest's clipboard holds it."""
        if not isinstance(text, str) or "\0" in text:
            raise InvalidArgument("clipboard text is a str without NUL characters")
        data = text.encode()
        if len(data) > MAX_CLIPBOARD:
            raise InvalidArgument(f"clipboard text is at most {MAX_CLIPBOARD} bytes")
        # xclip forks a child that owns the selection until another client takes it; it is
        # started as a kept process (an exec's processes die with it), and the script
        # waits (bounded) until the selection reads back as written.
        script = (
            'f=$(mktemp) && cat > "$f" && xclip -selection clipboard -i "$f" >/dev/null 2>&1 '
            '&& i=0 && until xclip -selection clipboard -o 2>/dev/null | cmp -s - "$f"; do '
            '[ $i -ge 200 ] && { rm -f "$f"; exit 1; }; sleep 0.1; i=$((i+1)); done; rm -f "$f"'
        )
        proc = self._sb.commands.start(["sh", "-c", script], env={"DISPLAY": DISPLAY}, stdin=data)
        r = proc.wait(timeout_seconds=60)
        if r.exit_code != 0:
            raise DesktopError(f"could not set the clipboard (exit {r.exit_code})")


class Stream:
    """The noVNC viewer: off until ``start``; bound to 127.0.0.1 unless asked otherwise."""

    def __init__(self, sandbox: DesktopSandbox) -> None:
        self._sb = sandbox
        self._forward: Any = None
        self.password: str | None = None

    def start(self, require_auth: bool = True, host: str = "127.0.0.1") -> str:
        """Forward noVNC and return its URL (with this session's VNC password in it)."""
        if not require_auth:
            raise InvalidArgument("the viewer always needs its per-session password")
        alphabet = string.ascii_letters + string.digits
        self.password = "".join(secrets.choice(alphabet) for _ in range(8))  # VNC uses 8
        self._sb.files.write(PASSWORD_FILE, self.password + "\n", mode=0o600)
        if self._forward is None:
            self._forward = self._sb.ports.forward(NOVNC_PORT, host=host)
        return self.url()

    def url(self) -> str:
        if self._forward is None or self.password is None:
            raise InvalidArgument("the viewer is not started", hint="call stream.start()")
        port = self._forward.host_port
        return (
            f"http://127.0.0.1:{port}/vnc.html?host=127.0.0.1&port={port}"
            f"&autoconnect=true&resize=scale&password={self.password}"
        )

    def stop(self) -> None:
        """Close the forward and replace the password (a copied URL stops working)."""
        if self._forward is not None:
            self._forward.close()
            self._forward = None
        self._sb.files.write(PASSWORD_FILE, secrets.token_hex(16) + "\n", mode=0o600)
        self.password = None


class DesktopSandbox(Sandbox):
    """A ``Sandbox`` with a desktop: the e2b-desktop verbs plus ``stream``."""

    def __init__(self, backend: Any, info: M.SandboxInfo) -> None:
        super().__init__(backend, info)
        self.stream = Stream(self)
        self.clipboard = Clipboard(self)
        self._size: tuple[int, int] | None = None

    @classmethod
    def create(  # type: ignore[override]
        cls,
        resolution: tuple[int, int] = DEFAULT_RESOLUTION,
        *,
        allow: list[str] | tuple[str, ...] = (),
        image: str = "desktop",
        name: str | None = None,
        ttl: str | float = DEFAULT_TTL,
        resources: Resources | None = None,
        env: dict[str, EnvValue] | None = None,
        tags: dict[str, str] | None = None,
    ) -> DesktopSandbox:
        """Start a desktop of ``resolution`` (up to MAX_RESOLUTION); ``allow``: sites it may
        reach (none: no network at all)."""
        size = check_resolution(resolution)
        if isinstance(allow, str):
            raise InvalidArgument("allow= takes a list of host[:port] patterns")
        spec = build_spec(
            image,
            name=name,
            workload_id=None,
            ttl=ttl,
            include=(),
            tags=tags,
            resources=resources or make_resources(memory_mb=DEFAULT_MEMORY_MB),
            network=network(mode="allow", allow=list(allow)) if allow else None,
            env=env,
            base=Path.cwd(),
        )
        sb = cls._create(spec)
        assert isinstance(sb, DesktopSandbox)
        if size != DEFAULT_RESOLUTION:
            try:
                sb.set_resolution(size)
            except BaseException:
                sb.kill()
                raise
        return sb

    # -- plumbing ---------------------------------------------------------------------
    def _x(self, argv: list[str], limit: int = 65536, timeout: float = 60) -> bytes:
        r = self.commands.run(
            argv, env={"DISPLAY": DISPLAY}, output_limit=limit, timeout_seconds=timeout
        )
        if r.exit_code != 0:
            raise DesktopError(f"{argv[0]} failed: {r.stderr.strip()[:300] or r.exit_code}")
        if r.truncated:
            raise DesktopError(f"{argv[0]}: output larger than {limit} bytes")
        return r.stdout_bytes

    def _xy(self, x: int, y: int) -> tuple[str, str]:
        w, h = self.get_screen_size()
        for v, hi, what in ((x, w, "x"), (y, h, "y")):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
                raise InvalidArgument(f"{what}={v!r} is off the {w}x{h} screen")
        return str(x), str(y)

    # -- screen -----------------------------------------------------------------------
    def get_screen_size(self) -> tuple[int, int]:
        if self._size is None:
            out = self._x(["xdotool", "getdisplaygeometry"]).decode().split()
            if len(out) != 2 or not all(p.isdecimal() and len(p) <= 5 for p in out):
                raise DesktopError(f"unexpected screen size {out[:2]!r}")
            self._size = (int(out[0]), int(out[1]))
        return self._size

    def set_resolution(self, resolution: tuple[int, int]) -> None:
        """Change the screen size (RandR on the running display; windows stay, the VNC
        viewer follows). ``create(resolution=...)`` calls this."""
        w, h = check_resolution(resolution)
        self._size = None
        self._x(resolution_script(w, h))
        if self.get_screen_size() != (w, h):
            raise DesktopError(f"the screen is {self._size}, not {w}x{h}, after the change")

    def screenshot(self) -> bytes:
        """A PNG of the whole screen (never in the audit log: only scrot's exec is).

        Under TCG each guest process start costs a few hundred ms, so this runs one
        (scrot, no shell/mktemp/cat/rm) and moves the bytes over the agent's file calls.
        ``-q 80`` is zlib level 1: scrot's default (75, level 2) compresses no smaller on
        a desktop and costs more emulated CPU."""
        path = f"{SHOT_DIR}/.mvm-screenshot-{secrets.token_hex(8)}.png"
        try:
            self._x(["scrot", "-q", "80", "-o", path])
            png = self.files.read(path)
        finally:
            try:
                self.files.remove(path)
            except MvmError:
                pass  # scrot failed before writing it; its error is the one that matters
        if len(png) > MAX_SCREENSHOT:
            raise DesktopError(f"screenshot larger than {MAX_SCREENSHOT} bytes")
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise DesktopError("the guest returned something that is not a PNG")
        return png

    def get_cursor_position(self) -> tuple[int, int]:
        out = self._x(["xdotool", "getmouselocation", "--shell"]).decode()
        vals = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        try:
            return int(vals["X"]), int(vals["Y"])
        except (KeyError, ValueError):
            raise DesktopError("unexpected cursor position from the guest") from None

    # -- mouse ------------------------------------------------------------------------
    def move_mouse(self, x: int, y: int) -> None:
        self._x(["xdotool", "mousemove", "--sync", *self._xy(x, y)])

    def _click(self, x: int | None, y: int | None, button: int, repeat: int = 1) -> None:
        argv = ["xdotool"]
        if x is not None or y is not None:
            if x is None or y is None:
                raise InvalidArgument("give both x and y, or neither")
            argv += ["mousemove", "--sync", *self._xy(x, y)]
        argv += ["click", "--repeat", str(repeat), str(button)]
        self._x(argv)

    def left_click(self, x: int | None = None, y: int | None = None) -> None:
        self._click(x, y, 1)

    def double_click(self, x: int | None = None, y: int | None = None) -> None:
        self._click(x, y, 1, repeat=2)

    def right_click(self, x: int | None = None, y: int | None = None) -> None:
        self._click(x, y, 3)

    def middle_click(self, x: int | None = None, y: int | None = None) -> None:
        self._click(x, y, 2)

    def drag(self, fr: tuple[int, int], to: tuple[int, int]) -> None:
        a, b = self._xy(*fr), self._xy(*to)
        mid = (str((int(a[0]) + int(b[0])) // 2), str((int(a[1]) + int(b[1])) // 2))
        move = ["mousemove", "--sync"]  # through a midpoint: some programs need the motion
        self._x(["xdotool", *move, *a, "mousedown", "1", *move, *mid, *move, *b, "mouseup", "1"])

    def scroll(self, direction: str = "down", amount: int = 1) -> None:
        if direction not in SCROLL:
            raise InvalidArgument(f"direction is one of {', '.join(SCROLL)}")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= 100:
            raise InvalidArgument("amount is 1 to 100")
        self._x(["xdotool", "click", "--repeat", str(amount), str(SCROLL[direction])])

    # -- keyboard ---------------------------------------------------------------------
    def write(self, text: str, delay_ms: int = 12) -> None:
        """Type ``text`` into the focused window."""
        check_text(text)
        self._x(["xdotool", "type", "--delay", str(int(delay_ms)), "--", text], timeout=120)

    def press(self, keys: str | list[str]) -> None:
        """Press a key or chord (``"Return"``, ``"ctrl+c"``), or several in turn."""
        self._x(["xdotool", "key", "--", *check_keys(keys)])

    # -- apps -------------------------------------------------------------------------
    def open(self, target: str) -> None:
        """Open a URL (Chromium through the sandbox's egress proxy) or a guest file."""
        if not isinstance(target, str) or "\0" in target or len(target) > 4000:
            raise InvalidArgument("open takes a URL or an absolute guest path")
        if not URL_RE.match(target):
            if not target.startswith("/"):
                raise InvalidArgument("open takes a URL or an absolute guest path")
            target = "file://" + target
        self.commands.start(
            ["chromium", "--no-sandbox", "--no-first-run", "--disable-gpu",
             "--proxy-server=http://10.0.2.100:3128", target],
            env={"DISPLAY": DISPLAY, "HOME": "/home/user"},
        )  # fmt: skip

    def wait_window(self, title: str, timeout: float = 120) -> None:
        """Wait (bounded) until a window whose title is ``title`` is on the screen."""
        if not isinstance(title, str) or not TITLE_RE.match(title):
            raise InvalidArgument("title: 1 to 64 letters, digits, '.', '_', '-' or spaces")
        search = ["xdotool", "search", "--sync", "--onlyvisible", "--name", f"^{title}$"]
        self._x(["timeout", str(int(timeout)), *search], timeout=timeout + 10)

    def launch(self, argv: list[str]) -> None:
        """Start a program on the display (e.g. ``["xterm"]``) in the background."""
        self.commands.start(argv, env={"DISPLAY": DISPLAY, "HOME": "/home/user"})


class AsyncClipboard:
    def __init__(self, c: Clipboard) -> None:
        self._c = c

    async def read(self) -> str:
        return await to_thread(self._c.read)

    async def write(self, text: str) -> None:
        await to_thread(self._c.write, text)


class AsyncDesktopSandbox:
    """``DesktopSandbox`` for asyncio: every verb in a worker thread."""

    def __init__(self, sandbox: DesktopSandbox) -> None:
        self.sync = sandbox
        self.name = sandbox.name
        self.clipboard = AsyncClipboard(sandbox.clipboard)

    @classmethod
    async def create(cls, *args: Any, **kw: Any) -> AsyncDesktopSandbox:
        return cls(await to_thread(DesktopSandbox.create, *args, **kw))

    def __getattr__(self, verb: str) -> Any:
        fn = getattr(self.sync, verb)
        if not callable(fn):
            return fn

        async def call(*args: Any, **kw: Any) -> Any:
            return await to_thread(fn, *args, **kw)

        return call

    async def __aenter__(self) -> AsyncDesktopSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await to_thread(self.sync.__exit__, *exc)


__all__ = ["AsyncDesktopSandbox", "DesktopError", "DesktopSandbox"]
