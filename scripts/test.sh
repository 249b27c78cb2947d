#!/usr/bin/env bash
# vdpakit's one test command: what a user types and what CI (.ci/run) calls.
#
# On a fresh Debian machine with Rust it installs what the tests need (apt packages, as root),
# reserves hugepages when it can, then runs the whole suite: formatting, clippy with -D warnings,
# every crate's tests (guest tests included), the loom model checks of the rings, and one pass of
# each benchmark in test mode.
#
# Environment:
#   VDPAKIT_NO_INSTALL=1   do not install packages (missing ones are reported; tests that need
#                          them are skipped with the reason, never counted as passed)
#   VDPAKIT_HUGEPAGES=N    2 MiB hugepages to make sure are reserved (default 512; 0: leave as is)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

say() { printf '\n==> %s\n' "$*"; }

# ---------------------------------------------------------------- packages
# qemu-system-x86, busybox-static, cpio, xz-utils, kmod: guest tests (tests/vmtest).
# dpdk-dev: dpdk-testpmd, the reference peer. iproute2: network namespaces for tests.
APT_PACKAGES=(qemu-system-x86 busybox-static cpio xz-utils kmod dpdk-dev iproute2 procps)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The guest tests fetch the Debian 6.12 kernel with `apt-get download`, which needs current package
# lists even when nothing is missing.
if [[ $(id -u) -eq 0 && ${VDPAKIT_NO_INSTALL:-0} != 1 ]]; then
    apt-get update -q >/dev/null 2>&1 || say "apt-get update failed; guest tests may be skipped (no kernel package)"
fi
if ((${#missing[@]})); then
    if [[ ${VDPAKIT_NO_INSTALL:-0} == 1 ]]; then
        say "not installing (VDPAKIT_NO_INSTALL=1); missing: ${missing[*]}"
    elif [[ $(id -u) -ne 0 ]]; then
        say "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
    else
        say "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
            say "package installation failed; tests that need ${missing[*]} will be skipped with the reason"
        fi
    fi
fi

# ---------------------------------------------------------------- hugepages
want=${VDPAKIT_HUGEPAGES:-512}
if [[ $want -gt 0 && -w /proc/sys/vm/nr_hugepages ]]; then
    have=$(cat /proc/sys/vm/nr_hugepages)
    if ((have < want)); then
        echo "$want" >/proc/sys/vm/nr_hugepages 2>/dev/null || true
    fi
fi
# DPDK (the reference peer) needs a mounted hugetlbfs; vdpakit itself does not (memfd).
if [[ $(id -u) -eq 0 ]] && ! grep -q " hugetlbfs " /proc/mounts; then
    mkdir -p /dev/hugepages && mount -t hugetlbfs nodev /dev/hugepages 2>/dev/null || true
fi
say "hugepages: $(grep -E 'HugePages_(Total|Free)' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"

# ---------------------------------------------------------------- the suite
status=0
step() {
    local name=$1
    shift
    say "$name: $*"
    local t0=$(date +%s)
    if "$@"; then
        echo "--- $name: ok ($(( $(date +%s) - t0 )) s)"
    else
        echo "--- $name: FAILED ($(( $(date +%s) - t0 )) s)"
        status=1
        failed_steps+=("$name")
    fi
}
failed_steps=()

if cargo fmt --version >/dev/null 2>&1; then
    step fmt cargo fmt --all -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
    step clippy cargo clippy --workspace --all-targets --locked -- -D warnings
fi
# The whole workspace's tests (unit, integration, guest) in one cargo invocation. Output is kept
# so the skip reasons can be listed at the end.
log=$(mktemp)
step tests bash -o pipefail -c 'cargo test --workspace --locked 2>&1 | tee "$0"' "$log"
# Memory-ordering model checks of the rings (a separate build with --cfg loom).
step loom env RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p vdpakit-ring --test loom --release --locked
# Every criterion benchmark once, as a test (figures come from scripts/bench.sh, not from here).
step benches cargo test -p vdpakit-benches --benches --locked

skips=$(grep -E '^SKIP ' "$log" 2>/dev/null | sort -u)
if [[ -n $skips ]]; then
    say "skipped (reported as ignored, not passed):"
    echo "$skips"
fi
rm -f "$log"
say "done in $(( $(date +%s) - start )) s"
if ((status)); then
    echo "FAILED steps: ${failed_steps[*]}"
fi
exit $status
