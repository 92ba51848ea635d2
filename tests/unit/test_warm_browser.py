"""Pure parts of warm recipes and the browser SDK: manifests, keys, URL rewriting, names."""

from __future__ import annotations

import pytest

from mvm import templates, warm
from mvm.errors import InvalidArgument, ManifestError
from mvm.images import manifest
from mvm.sdk import browser

BASE = """name = "b"
packages = ["chromium"]
"""


def key(w: str | None) -> str:
    return templates.template_key(
        image_id="i",
        initramfs="r",
        cpus=1,
        memory_mb=1024,
        overlay_size="512m",
        accel="tcg",
        qemu="q",
        network=True,
        warm=w,
    )


def test_preset_declares_a_recipe() -> None:
    m = manifest.load_preset("browser")
    assert m.warm is not None
    assert "--remote-debugging-port=9222" in m.warm.setup[-1]
    assert "--proxy-server=http://10.0.2.100:3128" in m.warm.setup[-1]
    assert "127.0.0.1:9222/json/version" in m.warm.probe[-1]
    assert "/proc/stat" in m.warm.probe[-1]  # and the guest has settled before the snapshot


def test_recipe_hash_is_in_the_template_key() -> None:
    a = manifest.parse(BASE + '[warm]\nsetup = ["sleep", "9"]\nprobe = ["true"]\n')
    b = manifest.parse(BASE + '[warm]\nsetup = ["sleep", "8"]\nprobe = ["true"]\n')
    assert a.warm is not None and b.warm is not None
    assert warm.key_part(None) is None
    ka, kb = key(warm.key_part(a.warm)), key(warm.key_part(b.warm))
    assert len({ka, kb, key(None)}) == 3
    assert ka == key(warm.recipe_hash(a.warm))  # stable


def test_recipe_does_not_change_the_rootfs() -> None:
    plain = manifest.parse(BASE)
    warmed = manifest.parse(BASE + '[warm]\nsetup = ["x"]\nprobe = ["y"]\n')
    assert plain.rootfs_key() == warmed.rootfs_key()


@pytest.mark.parametrize(
    "table",
    [
        'setup = []\nprobe = ["true"]',
        'setup = ["x"]\nprobe = []',
        'setup = ["x"]\nprobe = ["y"]\ntimeout = 0',
        'setup = ["x"]\nprobe = ["y"]\ntimeout = 99999',
        'setup = ["x"]\nprobe = ["y"]\nuser = "nobody"',
        'setup = ["x"]\nprobe = ["y"]\nextra = 1',
    ],
)
def test_bad_recipes_are_refused(table: str) -> None:
    with pytest.raises(ManifestError):
        manifest.parse(BASE + "[warm]\n" + table + "\n")


def test_ws_url_is_rewritten_to_the_host_port() -> None:
    v = {"webSocketDebuggerUrl": "ws://127.0.0.1:9222/devtools/browser/ab-12"}
    assert browser.ws_url(v, 41234) == "ws://127.0.0.1:41234/devtools/browser/ab-12"
    v = {"webSocketDebuggerUrl": "ws://localhost/devtools/browser/ab-12"}
    assert browser.ws_url(v, 5) == "ws://127.0.0.1:5/devtools/browser/ab-12"


@pytest.mark.parametrize(
    "v",
    [
        {},
        [],
        {"webSocketDebuggerUrl": 3},
        {"webSocketDebuggerUrl": "http://x/devtools/browser/a"},
        {"webSocketDebuggerUrl": "ws://x/devtools/page/a"},
        {"webSocketDebuggerUrl": "ws://x/devtools/browser/a/../../etc"},
        {"webSocketDebuggerUrl": "ws://x/devtools/browser/a?x=1"},
    ],
)
def test_ws_url_refuses_what_a_hostile_guest_might_say(v: object) -> None:
    with pytest.raises(browser.BrowserUnavailable):
        browser.ws_url(v, 1)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x\0", "a" * 256])
def test_download_names_are_checked(name: str) -> None:
    with pytest.raises(InvalidArgument):
        browser.check_file_name(name)


def test_no_allow_means_no_network() -> None:
    spec = browser.browser_spec((), "browser", None, None, "30m", None, None, None)
    assert spec.network.preset == "none" and spec.network.allow == []
    assert spec.memory_mb == browser.DEFAULT_MEMORY_MB
    spec = browser.browser_spec(["a.test:8080"], "browser", None, None, "30m", None, None, None)
    assert spec.network.allow == ["a.test:8080"]
    with pytest.raises(InvalidArgument):
        browser.browser_spec("a.test", "browser", None, None, "30m", None, None, None)  # type: ignore[arg-type]


def test_preset_turns_off_chromium_background_traffic() -> None:
    """Chromium's own connections (updates, sync, safe browsing...) would be refused and
    audited by the egress proxy as noise: the recipe switches them off."""
    m = manifest.load_preset("browser")
    assert m.warm is not None
    setup = m.warm.setup[-1]
    for flag in (
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--gaia-url=http://127.0.0.1:9",  # accounts.google.com: not switched off otherwise
        "--component-updater=url-source=http://127.0.0.1:9",  # update.googleapis.com
    ):
        assert flag in setup, flag


def test_desktop_preset_matches_the_sdk_resolutions() -> None:
    from mvm.sdk import desktop

    m = manifest.load_preset("desktop")
    assert m.warm is not None
    assert {"xclip", "x11-xserver-utils"} <= set(m.packages)
    setup = m.warm.setup[-1]
    (w, h), (dw, dh) = desktop.MAX_RESOLUTION, desktop.DEFAULT_RESOLUTION
    assert f"-screen 0 {w}x{h}x24" in setup  # the framebuffer every size shrinks from
    assert f"--mode mvm-{dw}x{dh}" in setup and "-xrandr" in setup
    assert f"dimensions: *{dw}x{dh} " in m.warm.probe[-1]
