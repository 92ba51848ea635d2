#!/usr/bin/env bash
# Install mvm on Debian 12, as root: apt packages, a virtualenv with mvm (and
# `mvmctl` on PATH), the kernel and the default image; then run a real sandbox.
#
#   ./install.sh              install, build the default image, run a sandbox
#   ./install.sh --no-demo    the same without the demo sandbox (used by run-tests.sh)
#   ./install.sh --dev        also install the test/lint tools into the venv
#
# Safe to re-run: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

demo=1
extras="[mcp]"   # `mvmctl mcp` needs the official MCP SDK
for arg in "$@"; do
    case "$arg" in
        --no-demo) demo=0 ;;
        --dev) extras="[dev,ray]" ;;  # ray: the cluster tests (mvm[ray])
        *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (apt-get and image builds need it)" >&2
    exit 1
fi

# Host tools: QEMU (microvm machine), busybox for the initramfs, mmdebstrap and
# e2fsprogs for root filesystems, lz4/zstd to unpack Debian's kernel, venv for Python,
# iproute2 for the network tests' namespace test host.
APT_PACKAGES="qemu-system-x86 busybox-static e2fsprogs lz4 zstd mmdebstrap cpio python3-venv ca-certificates iproute2"
missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "==> apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
# The kernel comes from the host's apt lists: make sure they exist.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt-get update -q
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: mvm needs Python >= 3.11 (found $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "==> pip install -e .$extras"
.venv/bin/pip install -q --disable-pip-version-check -e ".$extras"
# An editable install leaves mvm's own modules uncompiled, and where PYTHONDONTWRITEBYTECODE
# is set nothing ever writes their bytecode: every mvmctl call would compile them again
# (about a third of a short command's CPU, bench/cli.py).
.venv/bin/python -m compileall -q src/mvm >/dev/null
ln -sf "$PWD/.venv/bin/mvmctl" /usr/local/bin/mvmctl

# --- TypeScript SDK (sdk-ts/, docs/sdk-ts.md): Node.js from Debian if missing, then
# npm ci (tsx, the runner's loader; typescript to build) and tsc. Self-contained; safe to re-run.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "==> apt-get install nodejs npm (for the TypeScript SDK)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends nodejs npm \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends nodejs npm; }
fi
if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>18||(a===18&&b>=19)?0:1)'; then
    echo "install.sh: the TypeScript SDK needs Node.js >= 18.19 (found $(node --version))" >&2
    exit 1
fi
echo "==> building the TypeScript SDK (sdk-ts)"
if [ ! -f sdk-ts/node_modules/.package-lock.json ] || [ sdk-ts/package-lock.json -nt sdk-ts/node_modules/.package-lock.json ]; then
    (cd sdk-ts && npm ci --no-audit --no-fund --loglevel=error)
fi
(cd sdk-ts && rm -rf dist && npx tsc -p .)
# --- end of the TypeScript SDK block

echo "==> building the default image (cached after the first time)"
.venv/bin/mvmctl build --preset python

if [ "$extras" = "[dev,ray]" ]; then
    # The test suite's other images: big, so built once per machine (cached by content
    # hash in $MVM_HOME) rather than by the tests that need them.
    for preset in python-data browser desktop builder; do
        echo "==> building the $preset image (cached after the first time)"
        .venv/bin/mvmctl build --preset "$preset"
    done
fi

if [ "$demo" = 1 ]; then
    echo "==> running a sandbox: mvmctl run -- python3 -c ..."
    .venv/bin/mvmctl run --timeout 60 -- python3 -c 'import platform; print("hello from a microVM running", platform.platform())'
    echo "==> done. Try: mvmctl run -- python3 -c 'print(2 + 2)'"
fi
