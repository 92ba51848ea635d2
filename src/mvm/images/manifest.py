"""Image manifests (``mvm.toml`` or a preset): what goes into an image, and its cache key."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from importlib import resources
from pathlib import Path

import msgspec

from mvm import names
from mvm.errors import ManifestError, UnknownPreset

NAME_RE = names.LOWER_RE  # the one image-name rule (mvm.names)
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
SUITES = ("bookworm", "trixie")
#: Packages every image gets: the agent is stdlib Python, and python3-minimal alone
#: lacks modules it needs (json).
BASE_PACKAGES = ("python3-minimal", "libpython3-stdlib")
#: Bumped when the rootfs recipe (hooks, layout) changes, so caches rebuild.
RECIPE_VERSION = 1
DEFAULT_IMAGE = "python"


class Warm(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A warm-template recipe (``[warm]``): see ``mvm.warm``."""

    setup: list[str]
    probe: list[str]
    timeout: float = 240.0
    user: str = "user"


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    suite: str = "bookworm"
    packages: list[str] = []
    aliases: list[str] = []
    description: str = ""
    env: dict[str, str] = {}
    warm: Warm | None = None

    def all_packages(self) -> list[str]:
        return sorted(set(BASE_PACKAGES) | set(self.packages))

    def rootfs_key(self) -> str:
        """Hash of everything that decides the root filesystem's contents."""
        doc = {
            "recipe": RECIPE_VERSION,
            "suite": self.suite,
            "packages": self.all_packages(),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def validate(m: Manifest, origin: str) -> Manifest:
    for n in [m.name, *m.aliases]:
        if not names.is_valid("image", n):
            raise ManifestError(
                f"{origin}: invalid image name {n!r}",
                hint="use lower-case letters, digits, '.', '_' and '-' (max 63)",
            )
    if m.suite not in SUITES:
        raise ManifestError(
            f"{origin}: unsupported suite {m.suite!r}",
            hint=f"use one of: {', '.join(SUITES)}",
        )
    bad = [p for p in m.packages if not PACKAGE_RE.match(p)]
    if bad:
        raise ManifestError(f"{origin}: invalid Debian package names: {', '.join(bad)}")
    if m.warm is not None:
        from mvm.warm import check_recipe

        check_recipe(m.warm, origin)
    for k in m.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise ManifestError(f"{origin}: invalid environment variable name {k!r}")
    return m


def parse(text: str, origin: str = "<manifest>") -> Manifest:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{origin}: not valid TOML: {exc}") from None
    image = raw.get("image", raw)  # mvm.toml nests under [image]; presets are flat
    try:
        m = msgspec.convert(image, Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"{origin}: {exc}") from None
    return validate(m, origin)


def preset_names() -> list[str]:
    files = resources.files("mvm.images").joinpath("presets")
    return sorted(p.name.removesuffix(".toml") for p in files.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> Manifest:
    if name not in preset_names():
        # A preset may also be asked for by the image name or alias it builds.
        for p in preset_names():
            m = load_preset(p)
            if name == m.name or name in m.aliases:
                return m
        raise UnknownPreset(
            f"unknown preset {name!r}",
            hint=f"known presets: {', '.join(preset_names())}",
            preset=name,
        )
    text = resources.files("mvm.images").joinpath("presets", f"{name}.toml").read_text()
    return parse(text, f"preset {name}")


def load_dir(path: Path) -> Manifest:
    f = path / "mvm.toml"
    if not f.is_file():
        raise ManifestError(
            f"no mvm.toml in {path}",
            hint="create one with `mvmctl init DIR --preset python`, or pass --preset",
        )
    return parse(f.read_text(), str(f))
