"""Browser sandboxes with the real client: Playwright (PyPI) drives the guest's Chromium over
``connect_over_cdp``; pages come from a stand-in internet reachable only through the
sandbox's egress proxy.

The ``browser`` image is built here if missing (so a fresh machine's test run builds it,
and a build failure fails the tests). One private mvmd; two browser sandboxes shared by the
module (Chromium is started once per shape, in the warm template, never per test).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mvm import paths
from mvm.images.store import ImageStore
from tests.integration import png
from tests.integration.mvmd_home import private_home, wait_until
from tests.integration.standin_internet import serve

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

#: 198.18.0.0/15 (benchmarking): not this machine's network, not a mirror's address (keep it so:
#: the veth route would hijack whatever lives in that /24).
NS_ADDR, HOST_ADDR, PORT = "198.18.77.2", "198.18.77.1", 8080
SITE = f"allowed.test:{PORT}"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "browser.md"
#: Playwright waits (ms): Chromium under TCG on a shared machine is slow.
PW_TIMEOUT = 300_000
PAYLOAD = secrets.token_bytes(200_000)
#: The hosts this module's tests ask for; any other host in the egress log is Chromium's own.
ASKED = {"allowed.test", "denied.test"}
#: How long after a sandbox is created its egress is watched for Chromium's own traffic
#: (an observation window, not a performance bound: its start-up fetches come in the
#: first minute of a browser's life, and the clone's browser is seconds old).
QUIET_WINDOW = 120.0

INDEX = """<!doctype html><html><head><title>mvm browser test</title></head><body>
<form id="f"><input id="name" name="name"><button id="go" type="submit">Go</button></form>
<p id="result"></p>
<a id="dl" href="payload.bin" download="payload.bin">download</a>
<script>
document.getElementById("f").addEventListener("submit", function (e) {
  e.preventDefault();
  document.getElementById("result").textContent =
    "Hello, " + document.getElementById("name").value + "!";
});
</script></body></html>
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text(INDEX)
    (root / "payload.bin").write_bytes(PAYLOAD)
    with serve(root, NS_ADDR, HOST_ADDR, PORT) as addr:
        yield addr


@pytest.fixture(scope="module")
def home(site: str) -> Iterator[Path]:
    """A private mvmd whose resolver knows allowed.test and denied.test; the SDK in this
    process talks to it (mvmd is started with this environment)."""
    source = paths.home()
    ImageStore(source).ensure("browser")  # built here on a fresh machine; failing fails
    saved = {k: os.environ.get(k) for k in ("MVM_HOME", "MVM_RUN_DIR", "MVM_EGRESS_RESOLVE")}
    with private_home("mvmbr-", source=source) as h:
        os.environ["MVM_HOME"] = str(h)
        os.environ.pop("MVM_RUN_DIR", None)
        os.environ["MVM_EGRESS_RESOLVE"] = f"allowed.test={site},denied.test={site}"
        try:
            yield h
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def sb(home: Path) -> Iterator[Any]:
    import mvm

    with mvm.BrowserSandbox.create(allow=[SITE], name="br-one") as s:
        yield s


@pytest.fixture(scope="module")
def sb2(home: Path) -> Iterator[Any]:
    import mvm

    with mvm.BrowserSandbox.create(allow=[SITE], name="br-two") as s:
        yield s


@pytest.fixture(scope="module")
def pw() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


def audit(home: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for f in sorted((home / "audit").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == event:
                out.append({**rec, **rec.get("data", {})})
    return out


def connect(pw: Any, sb: Any) -> Any:
    url = sb.cdp_url
    assert re.fullmatch(r"ws://127\.0\.0\.1:\d+/devtools/browser/[0-9a-f-]+", url), url
    return pw.chromium.connect_over_cdp(url, timeout=PW_TIMEOUT)


def test_form_and_screenshot_through_playwright(sb: Any, pw: Any) -> None:
    browser = connect(pw, sb)
    try:
        ctx = browser.new_context(viewport={"width": 800, "height": 600})
        ctx.set_default_timeout(PW_TIMEOUT)
        page = ctx.new_page()
        resp = page.goto(f"http://{SITE}/")
        assert resp is not None and resp.status == 200
        assert page.title() == "mvm browser test"
        page.fill("#name", "microVM")
        page.click("#go")
        page.wait_for_function("document.getElementById('result').textContent !== ''")
        assert page.text_content("#result") == "Hello, microVM!"
        assert png.size(page.screenshot()) == (800, 600)
        ctx.close()
    finally:
        browser.close()


def test_refused_navigation_fails_and_is_audited(sb: Any, pw: Any, home: Path) -> None:
    from playwright.sync_api import Error as PlaywrightError

    from mvm.sdk.browser import PageError

    browser = connect(pw, sb)
    try:
        ctx = browser.new_context()
        ctx.set_default_timeout(PW_TIMEOUT)
        page = ctx.new_page()
        with pytest.raises(PlaywrightError, match="ERR_TUNNEL_CONNECTION_FAILED"):
            page.goto("https://denied.test/")
        # Chromium turns the proxy's 403 for a plain-http load into its error page
        with pytest.raises(PlaywrightError):
            page.goto(f"http://denied.test:{PORT}/")
        ctx.close()
    finally:
        browser.close()
    with pytest.raises(PageError, match=r"refused|failed"):
        sb.screenshot(f"http://denied.test:{PORT}/")
    denied = [r for r in audit(home, "egress.denied") if r.get("host") == "denied.test"]
    assert denied and all(r.get("sandbox") == "br-one" for r in denied), denied


def test_sdk_screenshot_is_a_png_and_only_hashed_in_audit(sb: Any, home: Path) -> None:
    shot = sb.screenshot(f"http://{SITE}/")
    assert png.size(shot) == (1280, 720)
    import hashlib

    digest = hashlib.sha256(shot).hexdigest()
    finished = audit(home, "cmd.exec.finished")
    assert any(
        r.get("stdout_sha256") == digest and r.get("stdout_bytes") == len(shot) for r in finished
    )
    log_text = "".join(f.read_text() for f in (home / "audit").glob("*.jsonl"))
    assert "iVBORw0KGgo" not in log_text  # no base64 PNG anywhere in the audit log


def test_download_is_listed_and_read_back_exactly(sb: Any, pw: Any) -> None:
    browser = connect(pw, sb)
    try:
        session = browser.new_browser_cdp_session()
        session.send("Browser.setDownloadBehavior", sb.downloads.cdp_params())
        page = browser.contexts[0].new_page()
        page.set_default_timeout(PW_TIMEOUT)
        page.goto(f"http://{SITE}/")
        page.click("#dl")
        assert wait_until(
            lambda: any(e.name == "payload.bin" for e in sb.downloads.list()), 180, 1.0
        ), sb.downloads.list()
        page.close()
    finally:
        browser.close()
    assert sb.downloads.read("payload.bin") == PAYLOAD


def test_two_browser_sandboxes_do_not_share_cookies(sb: Any, sb2: Any, pw: Any) -> None:
    token = secrets.token_hex(8)
    for which, s in (("one", sb), ("two", sb2)):
        browser = connect(pw, s)
        try:
            page = browser.contexts[0].new_page()
            page.set_default_timeout(PW_TIMEOUT)
            page.goto(f"http://{SITE}/")
            before = page.evaluate("document.cookie")
            if which == "one":
                page.evaluate(f"document.cookie = 'k={token}; max-age=3600'")
                assert f"k={token}" in page.evaluate("document.cookie")
            else:
                assert token not in before, before
                assert not [c for c in browser.contexts[0].cookies() if token in c["value"]]
            page.close()
        finally:
            browser.close()


def test_docs_example_runs(home: Path) -> None:
    text = DOCS.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None
    env = {**os.environ, "SITE": SITE}
    r = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "title: mvm browser test" in r.stdout
    assert re.search(r"screenshot: \d+ bytes", r.stdout)


def test_chromium_makes_no_connections_of_its_own(sb: Any, sb2: Any, home: Path) -> None:
    """Only what a client asks for reaches the egress proxy: none of Chromium's background
    traffic (updates, sync, safe browsing, metrics...) is refused and audited as noise."""
    sb.screenshot(f"http://{SITE}/")  # a page load, as any test here makes
    born = min(s.info().created for s in (sb, sb2))
    time.sleep(max(0.0, born + QUIET_WINDOW - time.time()))
    records = audit(home, "egress.allowed") + audit(home, "egress.denied")
    assert any(r.get("host") == "allowed.test" for r in records)  # the log is being read
    stray = {
        (str(r.get("sandbox")), str(r.get("host")), str(r.get("port")))
        for r in records
        if r.get("host") not in ASKED
    }
    assert not stray, sorted(stray)
