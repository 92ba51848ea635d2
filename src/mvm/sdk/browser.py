"""``mvm.BrowserSandbox``: a sandbox of the ``browser`` image, Chromium already running.

The image's warm recipe (``mvm.warm``, ``[warm]`` in presets/browser.toml) keeps Chromium
headless with DevTools on the guest's loopback port 9222, so a sandbox comes up with the
browser alive. The host reaches it through a port forward over the agent channel (no NIC
needed for control): ``cdp_url`` is ``ws://127.0.0.1:PORT/devtools/browser/<id>`` for
Playwright's ``connect_over_cdp`` or Puppeteer's ``connect``. Page loads go through the
sandbox's egress proxy only, so ``allow=[...]`` is the list of sites it may load; with no
``allow`` the VM has no network device at all. ``screenshot`` and ``downloads.read`` run
in the guest and come out through an audited exec (the audit log keeps hash and size).
"""

from __future__ import annotations

import importlib.resources
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx

from mvm.api import models as M
from mvm.errors import InvalidArgument, MvmError
from mvm.sdk.backend import SandboxSpec
from mvm.sdk.options import EnvValue, Resources, network, resources
from mvm.sdk.sandbox import DEFAULT_TTL, AsyncSandbox, Sandbox, build_spec
from mvm.sdk.threads import to_thread

#: Chromium's DevTools port in the guest (loopback only; see presets/browser.toml).
CDP_PORT = 9222
#: Where downloads land in the guest (the profile's download directory).
DOWNLOADS_DIR = "/home/user/Downloads"
#: Largest download ``downloads.read`` returns, and largest screenshot (an exec's output cap).
MAX_DOWNLOAD = 16 << 20
MAX_SCREENSHOT = 16 << 20
#: What a browser needs by default (Chromium under TCG wants 1 GiB).
DEFAULT_MEMORY_MB = 1024
#: Seconds Chromium's ``/json/version`` may take to answer (a restored clone under TCG
#: translates the browser's code afresh; on a loaded host that takes a while).
CDP_TIMEOUT = 180.0
#: Seconds a page may take to load for ``screenshot``.
LOAD_TIMEOUT = 120.0
WS_PATH_RE = re.compile(r"^/devtools/browser/[A-Za-z0-9-]{1,64}$")
FILE_NAME_RE = re.compile(r"^[^/\0]{1,255}$")


class PageError(MvmError):
    """A page could not be loaded (refused by the network policy, unreachable, too slow)."""


class BrowserUnavailable(MvmError):
    """Chromium's DevTools endpoint did not answer in the sandbox."""


def ws_url(version: Any, host_port: int) -> str:
    """``webSocketDebuggerUrl`` of ``/json/version`` (guest-given: checked) rewritten to
    the host end of the forward."""
    url = version.get("webSocketDebuggerUrl") if isinstance(version, dict) else None
    if not isinstance(url, str) or not url.startswith("ws://"):
        raise BrowserUnavailable("DevTools /json/version has no webSocketDebuggerUrl")
    path = "/" + url[len("ws://") :].split("/", 1)[-1]
    if not WS_PATH_RE.match(path):
        raise BrowserUnavailable(f"unexpected DevTools endpoint {url[:120]!r}")
    return f"ws://127.0.0.1:{host_port}{path}"


def check_file_name(name: str) -> str:
    if not isinstance(name, str) or not FILE_NAME_RE.match(name) or name in (".", ".."):
        raise InvalidArgument(f"invalid download name {name!r}", hint="see downloads.list()")
    return name


def guest_script() -> str:
    return importlib.resources.files("mvm.sdk").joinpath("browser_guest.py").read_text()


class Downloads:
    """Files the browser saved in the guest (``DOWNLOADS_DIR``): untrusted bytes."""

    #: The guest directory; give it to ``Browser.setDownloadBehavior`` (see ``cdp_params``).
    path = DOWNLOADS_DIR

    def __init__(self, sandbox: BrowserSandbox) -> None:
        self._sb = sandbox

    def cdp_params(self) -> dict[str, Any]:
        """Parameters for CDP ``Browser.setDownloadBehavior`` that send downloads here."""
        return {"behavior": "allow", "downloadPath": DOWNLOADS_DIR, "eventsEnabled": True}

    def list(self) -> list[M.FileEntry]:
        """Finished downloads (Chromium's ``.crdownload`` partials are left out)."""
        entries = self._sb.files.list(DOWNLOADS_DIR)
        return [e for e in entries if e.type == "file" and not e.name.endswith(".crdownload")]

    def read(self, name: str, limit: int = MAX_DOWNLOAD) -> bytes:
        """The bytes of download ``name`` (at most ``limit``; larger raises). They come
        through an audited exec: the audit log gets their hash and size, never them."""
        check_file_name(name)
        if not 0 < limit <= MAX_DOWNLOAD:
            raise InvalidArgument(f"limit is 1 to {MAX_DOWNLOAD} bytes")
        r = self._sb.commands.run(
            ["cat", "--", f"{DOWNLOADS_DIR}/{name}"], output_limit=limit, timeout_seconds=120
        )
        if r.exit_code != 0:
            raise InvalidArgument(f"no download {name!r}: {r.stderr.strip()[:200]}")
        if r.truncated:
            raise InvalidArgument(f"download {name!r} is larger than {limit} bytes")
        return r.stdout_bytes


class BrowserSandbox(Sandbox):
    """A ``Sandbox`` with Chromium running: ``cdp_url``, ``screenshot``, ``downloads``."""

    def __init__(self, backend: Any, info: M.SandboxInfo) -> None:
        super().__init__(backend, info)
        self.downloads = Downloads(self)
        self._cdp: str | None = None

    @classmethod
    def create(  # type: ignore[override]
        cls,
        allow: list[str] | tuple[str, ...] = (),
        *,
        image: str = "browser",
        name: str | None = None,
        workload_id: str | None = None,
        ttl: str | float = DEFAULT_TTL,
        tags: dict[str, str] | None = None,
        resources: Resources | None = None,
        env: dict[str, EnvValue] | None = None,
    ) -> BrowserSandbox:
        """Start a browser sandbox that may load pages from ``allow`` (``host[:port]``
        patterns; none: no network at all). Lives until its ``ttl`` or ``kill()``."""
        sb = cls._create(browser_spec(allow, image, name, workload_id, ttl, tags, resources, env))
        assert isinstance(sb, BrowserSandbox)
        return sb

    # -- CDP ------------------------------------------------------------------------
    def cdp_port(self) -> int:
        """The host port forwarded to the guest's DevTools port (made on first use; a
        forward made by another client, e.g. ``mvmctl browser cdp``, is reused)."""
        for f in self.info().forwards:
            if f.guest_port == CDP_PORT and f.host == "127.0.0.1":
                return f.host_port
        return self.ports.forward(CDP_PORT).host_port

    @property
    def cdp_url(self) -> str:
        """``ws://127.0.0.1:PORT/devtools/browser/<id>``: the browser-level CDP endpoint."""
        if self._cdp is None:
            port = self.cdp_port()
            deadline = time.monotonic() + CDP_TIMEOUT
            while True:  # bounded: a busy clone may drop the first connections
                left = deadline - time.monotonic()
                try:
                    resp = httpx.get(f"http://127.0.0.1:{port}/json/version", timeout=left)
                    body = json.loads(resp.content[: 1 << 16])
                    break
                except (httpx.HTTPError, ValueError) as exc:
                    if time.monotonic() + 1.0 >= deadline:
                        raise BrowserUnavailable(
                            f"Chromium's DevTools endpoint in {self.name} did not answer "
                            f"within {CDP_TIMEOUT:g}s: {exc!r}",
                            hint="is this a sandbox of the browser image? (TCG under load is slow)",
                        ) from None
                    time.sleep(1.0)  # a poll interval, bounded by the deadline
            self._cdp = ws_url(body, port)
        return self._cdp

    # -- screenshots ------------------------------------------------------------------
    def screenshot(self, url: str | None = None, full_page: bool = False) -> bytes:
        """A PNG of ``url`` loaded in a fresh tab (or of a blank tab). Taken in the guest;
        the audit log keeps its hash and size. A refused or failed load raises PageError."""
        if url is not None and (not isinstance(url, str) or len(url) > 8192 or "\0" in url):
            raise InvalidArgument("url must be a str of at most 8192 characters")
        r = self.commands.run(
            [
                "python3",
                "-I",
                "-c",
                guest_script(),
                url or "",
                "full" if full_page else "view",
                str(LOAD_TIMEOUT),
            ],
            output_limit=MAX_SCREENSHOT,
            timeout_seconds=LOAD_TIMEOUT + 90,
        )
        err = r.stderr.strip()[:500]
        if r.exit_code == 3:
            raise PageError(err or f"could not load {url}", url=url)
        if r.exit_code != 0:
            raise BrowserUnavailable(f"screenshot failed: {err or r.exit_code}")
        if r.truncated or not r.stdout_bytes.startswith(b"\x89PNG\r\n\x1a\n"):
            raise BrowserUnavailable("the guest returned something that is not a whole PNG")
        return r.stdout_bytes


def browser_spec(
    allow: list[str] | tuple[str, ...],
    image: str,
    name: str | None,
    workload_id: str | None,
    ttl: str | float,
    tags: dict[str, str] | None,
    res: Resources | None,
    env: dict[str, EnvValue] | None,
) -> SandboxSpec:
    if isinstance(allow, str):
        raise InvalidArgument("allow= takes a list of host[:port] patterns, not a string")
    return build_spec(
        image,
        name=name,
        workload_id=workload_id,
        ttl=ttl,
        include=(),
        tags=tags,
        resources=res or resources(memory_mb=DEFAULT_MEMORY_MB),
        network=network(mode="allow", allow=list(allow)) if allow else None,
        env=env,
        base=Path.cwd(),
    )


class AsyncDownloads:
    def __init__(self, d: Downloads) -> None:
        self._d = d
        self.path = d.path

    def cdp_params(self) -> dict[str, Any]:
        return self._d.cdp_params()

    async def list(self) -> list[M.FileEntry]:
        return await to_thread(self._d.list)

    async def read(self, name: str, limit: int = MAX_DOWNLOAD) -> bytes:
        return await to_thread(self._d.read, name, limit)


class AsyncBrowserSandbox(AsyncSandbox):
    """``BrowserSandbox`` for asyncio (each call in a worker thread)."""

    sync: BrowserSandbox

    def __init__(self, sandbox: BrowserSandbox) -> None:
        super().__init__(sandbox)
        self.downloads = AsyncDownloads(sandbox.downloads)

    @classmethod
    async def create(  # type: ignore[override]
        cls, allow: list[str] | tuple[str, ...] = (), **kw: Any
    ) -> AsyncBrowserSandbox:
        return cls(await to_thread(BrowserSandbox.create, allow, **kw))

    @classmethod
    async def connect(cls, name: str) -> AsyncBrowserSandbox:
        sb = await to_thread(BrowserSandbox.connect, name)
        assert isinstance(sb, BrowserSandbox)
        return cls(sb)

    async def cdp_url(self) -> str:
        return await to_thread(lambda: self.sync.cdp_url)

    async def screenshot(self, url: str | None = None, full_page: bool = False) -> bytes:
        return await to_thread(self.sync.screenshot, url, full_page)


__all__ = ["AsyncBrowserSandbox", "BrowserSandbox", "BrowserUnavailable", "PageError"]
