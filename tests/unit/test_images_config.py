"""Image manifests/presets and the host apt sources re-targeted at an image's suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvm.errors import HostError, ManifestError, UnknownPreset
from mvm.images import apt_sources as A
from mvm.images import manifest as M

# --------------------------------------------------------------------------- manifest


def test_every_preset_loads() -> None:
    """Each shipped preset parses and validates; the default image is among them."""
    names = M.preset_names()
    assert names == sorted(names)
    assert {"minimal", "python", "python-3.13"} <= set(names)
    for n in names:
        m = M.load_preset(n)
        assert m.suite in M.SUITES
        assert m.packages
        assert len(m.rootfs_key()) == 64


def test_load_preset_by_image_name_and_alias() -> None:
    """A preset can be asked for by file name, image name, or alias."""
    by_file = M.load_preset("python")
    assert by_file.name == "python-3.11"
    assert M.load_preset("python-3.11") == by_file
    assert M.load_preset("default") == by_file
    assert M.load_preset(M.DEFAULT_IMAGE) == by_file
    assert M.load_preset("python-3.13").suite == "trixie"


def test_unknown_preset_hint() -> None:
    with pytest.raises(UnknownPreset) as info:
        M.load_preset("cobol")
    assert "cobol" in str(info.value)
    assert info.value.hint is not None
    for n in M.preset_names():
        assert n in info.value.hint
    assert info.value.data["preset"] == "cobol"


def test_parse_flat_and_nested() -> None:
    """Presets are flat; mvm.toml nests under [image]; both give the same manifest."""
    flat = 'name = "app"\nsuite = "trixie"\npackages = ["git", "g++"]\n'
    nested = "[image]\n" + flat
    a, b = M.parse(flat), M.parse(nested)
    assert a == b
    assert (a.name, a.suite, a.packages) == ("app", "trixie", ["git", "g++"])
    assert a.aliases == [] and a.env == {} and a.description == ""


def test_defaults() -> None:
    m = M.parse('name = "x1"')
    assert m.suite == "bookworm"
    assert m.all_packages() == sorted(M.BASE_PACKAGES)
    assert "python3-minimal" in M.BASE_PACKAGES  # the agent is stdlib Python


def test_all_packages_sorted_unique_with_base() -> None:
    m = M.parse('name = "x1"\npackages = ["zlib1g", "python3-minimal", "curl", "curl"]')
    assert m.all_packages() == sorted({"curl", "zlib1g", *M.BASE_PACKAGES})
    assert len(m.all_packages()) == len(set(m.all_packages()))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('name = "x"\nbogus = 1', "bogus"),
        ('[image]\nname = "x"\nversion = 2', "version"),
        ('name = "X"', "invalid image name"),
        ('name = "-x"', "invalid image name"),
        ('name = "a b"', "invalid image name"),
        ('name = "' + "a" * 64 + '"', "invalid image name"),
        ('name = "ok"\naliases = ["Bad!"]', "invalid image name"),
        ('name = "ok"\nsuite = "jammy"', "unsupported suite"),
        ('name = "ok"\nsuite = "bookworm-backports"', "unsupported suite"),
        ('name = "ok"\npackages = ["python3; rm -rf /"]', "invalid Debian package names"),
        ('name = "ok"\npackages = ["-o=APT::x"]', "invalid Debian package names"),
        ('name = "ok"\npackages = ["a"]', "invalid Debian package names"),
        ('name = "ok"\npackages = ["Python3"]', "invalid Debian package names"),
        ('name = "ok"\npackages = "python3"', "packages"),
        ('name = "ok"\nenv = {"1X" = "y"}', "environment variable"),
        ('name = "ok"\nenv = {"A" = 1}', "env"),
        ("suite = 'bookworm'", "name"),
        ("name = ", "not valid TOML"),
        ('image = "x"', "<manifest>"),
    ],
)
def test_parse_rejects(text: str, needle: str) -> None:
    """Bad manifests raise ManifestError naming the problem (and the origin)."""
    with pytest.raises(ManifestError) as info:
        M.parse(text, "<manifest>")
    assert needle in str(info.value)
    assert str(info.value).startswith("<manifest>")


def test_name_edge_cases_accepted() -> None:
    """The longest name, leading digit and every allowed punctuation, and package names
    with +, - and . come back exactly as written."""
    assert M.parse('name = "' + "a" * 63 + '"').name == "a" * 63
    m = M.parse('name = "0.a_b-c"')
    assert (m.name, m.packages) == ("0.a_b-c", [])
    pkgs = ["g++", "libc6-dev", "python3.11", "lib32z1"]
    m = M.parse('name = "ok"\npackages = ["g++", "libc6-dev", "python3.11", "lib32z1"]')
    assert (m.name, m.packages) == ("ok", pkgs)
    with pytest.raises(ManifestError):  # one past the longest is refused
        M.parse('name = "' + "a" * 64 + '"')


def test_rootfs_key_stable_and_sensitive() -> None:
    """Same content -> same key; packages or suite change it; cosmetic fields do not."""
    base = M.parse('name = "a"\npackages = ["git", "curl"]')
    assert base.rootfs_key() == M.parse('name = "a"\npackages = ["git", "curl"]').rootfs_key()
    # Order, duplicates, name, aliases, description and env do not change the rootfs.
    same = M.parse(
        'name = "b"\naliases = ["c"]\ndescription = "d"\nenv = {X = "1"}\n'
        'packages = ["curl", "git", "git"]'
    )
    assert same.rootfs_key() == base.rootfs_key()
    assert M.parse('name = "a"\npackages = ["git"]').rootfs_key() != base.rootfs_key()
    assert (
        M.parse('name = "a"\nsuite = "trixie"\npackages = ["git", "curl"]').rootfs_key()
        != base.rootfs_key()
    )
    # The base package is always in, so listing it explicitly changes nothing.
    assert (
        M.parse('name = "a"\npackages = ["git", "curl", "python3-minimal"]').rootfs_key()
        == base.rootfs_key()
    )


def test_rootfs_key_known_value() -> None:
    """Pin the hash recipe: changing it silently would orphan every cached image."""
    import hashlib
    import json

    m = M.parse('name = "a"\npackages = ["git"]')
    packages = sorted({"git", *M.BASE_PACKAGES})
    doc = {"recipe": M.RECIPE_VERSION, "suite": "bookworm", "packages": packages}
    assert m.rootfs_key() == hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def test_load_dir(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        M.load_dir(tmp_path)
    assert info.value.hint is not None and "mvmctl init" in info.value.hint
    (tmp_path / "mvm.toml").write_text('[image]\nname = "proj"\n')
    assert M.load_dir(tmp_path).name == "proj"
    (tmp_path / "mvm.toml").write_text('[image]\nname = "Proj"\n')
    with pytest.raises(ManifestError, match=str(tmp_path / "mvm.toml")):
        M.load_dir(tmp_path)


# --------------------------------------------------------------------------- apt sources

DEB822 = """\
# Debian sources (comments are ignored)
Types: deb deb-src
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.invalid/debian-security
Suites: bookworm-security
Components: main
Signed-By: -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBFyWrxkBEADIXCqFeWIAq2ZPSPt5YQ1Yhq3QIC9tl6Q
 -----END PGP PUBLIC KEY BLOCK-----

Types: deb
URIs: http://disabled.invalid/debian
Suites: bookworm-backports
Components: main
Enabled: no

Types: deb-src
URIs: http://src.invalid/debian
Suites: bookworm
Components: main
"""


def test_parse_deb822() -> None:
    """Comments, multi-line Signed-By, disabled and source-only entries."""
    srcs = A.parse_deb822(DEB822)
    assert [s.uris for s in srcs] == [
        ("http://mirror.invalid/debian",),
        ("http://security.invalid/debian-security",),
    ]
    assert srcs[0].suites == ("bookworm", "bookworm-updates")
    assert srcs[0].components == ("main", "contrib")
    assert srcs[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    key = srcs[1].signed_by
    assert key is not None
    assert key.splitlines() == [
        "-----BEGIN PGP PUBLIC KEY BLOCK-----",
        ".",
        "mQINBFyWrxkBEADIXCqFeWIAq2ZPSPt5YQ1Yhq3QIC9tl6Q",
        "-----END PGP PUBLIC KEY BLOCK-----",
    ]


def test_parse_deb822_field_names_case_insensitive() -> None:
    text = "types: deb\nuris: http://m.invalid/d\nsuites: trixie\ncomponents: main\nENABLED: yes\n"
    (s,) = A.parse_deb822(text)
    assert s.suites == ("trixie",)


def test_parse_deb822_skips_incomplete() -> None:
    assert A.parse_deb822("Types: deb\nSuites: bookworm\n") == []
    assert A.parse_deb822("Types: deb\nURIs: http://m.invalid/d\n") == []
    assert A.parse_deb822("") == []


def test_parse_one_line() -> None:
    """Classic sources.list: options in brackets, comments, deb-src ignored."""
    text = """\
# a comment
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.invalid/debian bookworm main non-free-firmware
deb http://mirror.invalid/debian bookworm-updates main # trailing comment
deb-src http://mirror.invalid/debian bookworm main
#deb http://commented.invalid/debian bookworm main
deb http://broken.invalid/debian
"""
    srcs = A.parse_one_line(text)
    assert srcs == [
        A.Source(
            ("http://mirror.invalid/debian",),
            ("bookworm",),
            ("main", "non-free-firmware"),
            "/usr/share/keyrings/k.gpg",
        ),
        A.Source(("http://mirror.invalid/debian",), ("bookworm-updates",), ("main",), None),
    ]


def test_codename() -> None:
    assert A.codename("bookworm-security") == "bookworm"
    assert A.codename("bullseye/updates") == "bullseye"
    assert A.codename("trixie") == "trixie"
    assert A.codename("cloud-sdk-bookworm") == "cloud"


def test_retarget_keeps_pockets_drops_foreign() -> None:
    """bookworm -> trixie keeps -updates/-security; non-Debian suites are dropped."""
    srcs = [
        A.Source(("http://mirror.invalid/debian",), ("bookworm", "bookworm-updates"), ("main",)),
        A.Source(("http://security.invalid/ds",), ("bookworm-security",), ("main",), "/k.gpg"),
        A.Source(("http://vendor.invalid/apt",), ("cloud-sdk-bookworm",), ("main",)),
        A.Source(("http://node.invalid/deb",), ("nodistro",), ("main",)),
        A.Source(("http://mirror.invalid/debian",), ("bookworm",), ()),
    ]
    out = A.retarget(srcs, "trixie")
    assert out == [
        A.Source(("http://mirror.invalid/debian",), ("trixie", "trixie-updates"), ("main",)),
        A.Source(("http://security.invalid/ds",), ("trixie-security",), ("main",), "/k.gpg"),
        # Same URI with a different suite set is kept; no components means main.
        A.Source(("http://mirror.invalid/debian",), ("trixie",), ("main",)),
    ]


def test_retarget_dedups_and_same_suite() -> None:
    s = A.Source(("http://mirror.invalid/debian",), ("bookworm",), ("main",))
    assert A.retarget([s, s], "bookworm") == [s]
    mixed = A.Source(("http://m.invalid/d",), ("bookworm", "nodistro"), ("main",))
    assert A.retarget([mixed], "trixie")[0].suites == ("trixie",)


def test_render_round_trips_through_parser() -> None:
    """What we hand to mmdebstrap parses back to the same sources (multi-line key too)."""
    srcs = A.retarget(A.parse_deb822(DEB822), "trixie")
    text = A.render_deb822(srcs)
    assert text.endswith("\n")
    assert A.parse_deb822(text) == srcs
    assert "Enabled" not in text and "deb-src" not in text
    assert "\n .\n" in text  # the blank line inside the key is kept as ' .'


def write_etc_apt(root: Path, files: dict[str, str]) -> Path:
    etc = root / "etc" / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (etc / name).write_text(text)
    return etc


def test_sources_for_suite_from_fake_host(tmp_path: Path) -> None:
    """sources.list + .list + .sources are combined; other files and foreign repos ignored."""
    etc = write_etc_apt(
        tmp_path,
        {
            "sources.list": "deb http://mirror.invalid/debian bookworm main\n",
            "sources.list.d/debian.sources": DEB822,
            "sources.list.d/google-cloud-sdk.list": (
                "deb [signed-by=/usr/share/keyrings/cloud.gpg] "
                "http://vendor.invalid/apt cloud-sdk-bookworm main\n"
            ),
            "sources.list.d/nodesource.sources": (
                "Types: deb\nURIs: http://node.invalid/deb\nSuites: nodistro\nComponents: main\n"
            ),
            "sources.list.d/old.list.save": "deb http://stale.invalid/debian bookworm main\n",
        },
    )
    text = A.sources_for_suite("trixie", etc)
    srcs = A.parse_deb822(text)
    uris = [s.uris[0] for s in srcs]
    assert "http://vendor.invalid/apt" not in uris
    assert "http://node.invalid/deb" not in uris
    assert "http://stale.invalid/debian" not in uris
    assert {s for x in srcs for s in x.suites} == {"trixie", "trixie-updates", "trixie-security"}
    assert "bookworm" not in text


def test_empty_etc_apt_is_host_error(tmp_path: Path) -> None:
    """No Debian sources at all: a HostError that says where to configure them."""
    etc = write_etc_apt(tmp_path, {})
    with pytest.raises(HostError) as info:
        A.sources_for_suite("bookworm", etc)
    assert str(etc) in str(info.value)
    assert info.value.hint is not None and "debian.sources" in info.value.hint


def test_only_foreign_repos_is_host_error(tmp_path: Path) -> None:
    etc = write_etc_apt(
        tmp_path,
        {"sources.list.d/x.list": "deb http://vendor.invalid/apt cloud-sdk-bookworm main\n"},
    )
    with pytest.raises(HostError):
        A.sources_for_suite("bookworm", etc)


def test_missing_etc_apt_is_host_error(tmp_path: Path) -> None:
    with pytest.raises(HostError):
        A.sources_for_suite("bookworm", tmp_path / "nowhere")
