"""Project directories: ``mvmctl init`` writes one, ``build``/``up`` read it.

A project is a directory with ``mvm.toml`` (the image manifest, under ``[image]``)
and the files that ``mvmctl up DIR`` copies into the sandbox's ``/work``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mvm.errors import InvalidArgument

#: Bounds on what ``up DIR`` uploads into /work.
MAX_FILES = 1000
MAX_TOTAL_BYTES = 64 * 1024 * 1024
SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".mypy_cache", ".pytest_cache"}

PYTHON_PACKAGES = (
    '["python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates"]'
)

TASK_PY = '''"""Example task: read /work/in.json if present, write /work/out.json."""
import json
import os
import pathlib

src = pathlib.Path("/work/in.json")
data = json.loads(src.read_text()) if src.exists() else {}
out = {"received": data, "mode": os.environ.get("MODE", "unset")}
pathlib.Path("/work/out.json").write_text(json.dumps(out))
print("hello from", os.uname().nodename, "-", out)
'''

SERVER_PY = '''"""Example HTTP service on port 8000 (forward it with `mvmctl forward`)."""
import http.server

http.server.ThreadingHTTPServer(("0.0.0.0", 8000), http.server.SimpleHTTPRequestHandler).serve_forever()
'''

PRESETS: dict[str, tuple[str, str, dict[str, str]]] = {
    # preset: (packages, comment, files)
    "minimal": (
        "[]",
        "Debian minbase + the Python stdlib the agent needs",
        {"task.sh": "#!/bin/sh\necho hello from $(uname -n)\n"},
    ),
    "python": (PYTHON_PACKAGES, "Python 3 with pip and venv", {"task.py": TASK_PY}),
    "worker": (
        PYTHON_PACKAGES,
        "a Python worker: task.py reads in.json, writes out.json",
        {"task.py": TASK_PY},
    ),
    "http": (PYTHON_PACKAGES, "a Python HTTP service on port 8000", {"server.py": SERVER_PY}),
}


def image_name_for(path: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", path.resolve().name.lower()).strip("-._") or "project"
    return name[:63]


def init_project(path: Path, preset: str) -> list[Path]:
    """Write mvm.toml and the preset's example files; refuse to overwrite anything."""
    if preset not in PRESETS:
        raise InvalidArgument(f"unknown preset {preset!r}", hint=f"presets: {', '.join(PRESETS)}")
    packages, comment, files = PRESETS[preset]
    manifest = (
        f"# mvm project ({preset} preset): {comment}.\n"
        "# Build with `mvmctl build DIR`; `mvmctl up DIR` copies this directory into /work.\n"
        "[image]\n"
        f'name = "{image_name_for(path)}"\n'
        'suite = "bookworm"\n'
        f"packages = {packages}\n"
        'env = { MODE = "dev" }\n'
    )
    wanted = {"mvm.toml": manifest, **files}
    clashes = [n for n in wanted if (path / n).exists()]
    if clashes:
        raise InvalidArgument(
            f"{path} already has {', '.join(clashes)}", hint="choose an empty directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in wanted.items():
        p = path / name
        p.write_text(text)
        if name.endswith(".sh"):
            p.chmod(0o755)
        written.append(p)
    return written


@dataclass(frozen=True)
class Upload:
    local: Path
    remote: str
    mode: int


def uploads(path: Path, dest: str = "/work") -> list[Upload]:
    """The files ``up DIR`` copies (bounded in count and size; links are not followed)."""
    out: list[Upload] = []
    total = 0
    root = path.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file() or (p.parent == root and f == "mvm.toml"):
                continue
            total += p.stat().st_size
            rel = p.relative_to(root).as_posix()
            out.append(Upload(p, f"{dest}/{rel}", p.stat().st_mode & 0o777))
            if len(out) > MAX_FILES or total > MAX_TOTAL_BYTES:
                raise InvalidArgument(
                    f"{path} holds more than {MAX_FILES} files or {MAX_TOTAL_BYTES >> 20} MiB",
                    hint="copy big inputs with `mvmctl cp` instead",
                )
    return out
