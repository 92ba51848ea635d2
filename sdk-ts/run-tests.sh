#!/usr/bin/env bash
# The TypeScript SDK's tests (node --test) against a real mvmd and real VMs.
#
# Builds the package (npm ci when node_modules is missing, then tsc), makes a private
# MVM_HOME under /tmp that shares the images, kernels and boot templates of the default
# home ($MVM_HOME, else ~/.local/share/mvm) through symlinks, stores the secret `api-key`,
# runs each compiled test file in turn (one mvmd, few VMs), and at the end removes every
# sandbox, stops that mvmd, kills any QEMU left for that home (by pid) and deletes it.
# The order is random, seeded once per run (printed; `./run-tests.sh` passes its own): the
# files are shuffled with it, and each file registers its tests in the seed's order
# (test/order.ts, `test` in test/helpers.ts). MVM_TEST_SEED=N replays an order.
#
#   sdk-ts/run-tests.sh                        all test files
#   sdk-ts/run-tests.sh sandbox modes          only dist/test/{sandbox,modes}.test.js
#   MVM_TEST_SEED=N sdk-ts/run-tests.sh        the order of the run that printed seed N
#   MVM_TS_TEST_NAME=RE sdk-ts/run-tests.sh sandbox   only its tests whose name matches RE
#                                                      (node --test-name-pattern; others skip)
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")"
SDK="$PWD"
ROOT="$(dirname "$SDK")"

MVMCTL="${MVMCTL:-$ROOT/.venv/bin/mvmctl}"
PYTHON="${MVM_TEST_PYTHON:-$ROOT/.venv/bin/python}"
for tool in node npm "$MVMCTL" "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "sdk-ts/run-tests.sh: $tool not found (run ./install.sh)" >&2; exit 1; }
done

seed="${MVM_TEST_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
case "$seed" in
    '' | *[!0-9]*) echo "sdk-ts/run-tests.sh: MVM_TEST_SEED must be a decimal number, not '$seed'" >&2; exit 1 ;;
esac

if [ ! -d node_modules ]; then
    npm ci --no-audit --no-fund --loglevel=error || exit 1
fi
rm -rf dist
npx tsc -p . || exit 1

base="${MVM_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/mvm}"
if ! ls "$base"/images/*.json >/dev/null 2>&1; then
    echo "sdk-ts/run-tests.sh: no images in $base (run ./install.sh)" >&2
    exit 1
fi
home="$(mktemp -d /tmp/mvts-XXXXXX)"
for d in rootfs kernels initramfs templates build.lock; do
    [ -e "$base/$d" ] && ln -s "$base/$d" "$home/$d"
done
mkdir "$home/images"
cp "$base"/images/*.json "$home/images/"

cleanup() {
    MVM_HOME="$home" timeout 180 "$MVMCTL" down --all >/dev/null 2>&1
    MVM_HOME="$home" timeout 60 "$MVMCTL" daemon stop >/dev/null 2>&1
    [ -n "${MVM_TS_KEEP_LOG:-}" ] && cp "$home/mvmd.log" "$MVM_TS_KEEP_LOG" 2>/dev/null
    for p in /proc/[0-9]*; do
        if tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q -- "$home"; then
            kill -9 "${p#/proc/}" 2>/dev/null
        fi
    done
    for d in rootfs kernels initramfs templates build.lock; do rm -f "$home/$d"; done
    rm -rf "$home"
}
trap cleanup EXIT

export MVM_HOME="$home" MVM_MVMCTL="$MVMCTL" MVM_TEST_PYTHON="$PYTHON" MVM_TEST_SEED="$seed"
unset MVM_RUN_DIR MVM_URL MVM_TOKEN MVM_SDK_MODE MVM_SDK_RECORD_DIR
MVM_TEST_SECRET="ts-s3cr3t-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export MVM_TEST_SECRET
printf '%s' "$MVM_TEST_SECRET" | "$MVMCTL" secret put api-key >/dev/null || exit 1

if [ "$#" -gt 0 ]; then
    files=()
    for n in "$@"; do files+=("dist/test/$n.test.js"); done
else
    files=(dist/test/*.test.js)
fi
n="${#files[@]}"
mapfile -t files < <(node dist/test/order.js "$seed" "${files[@]}")
[ "${#files[@]}" -eq "$n" ] || { echo "sdk-ts/run-tests.sh: could not order the test files" >&2; exit 1; }
echo "==> node --test (random order, seed $seed: replay with MVM_TEST_SEED=$seed sdk-ts/run-tests.sh)"
only=()
[ -n "${MVM_TS_TEST_NAME:-}" ] && only=(--test-name-pattern="$MVM_TS_TEST_NAME")
status=0
for f in "${files[@]}"; do
    echo "==> node --test $f"
    node --test "${only[@]}" "$f" || status=1
done
exit "$status"
