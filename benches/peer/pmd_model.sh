#!/usr/bin/env bash
# A PMD layer's cost: `vdpakit fwd` driving two functions of a PMD's device model
# cabled together (`--port KIND:model=b,vfs=2,wire=cable,poll=busy --port KIND:model=b,vf=1`,
# txonly on function 0, rxonly on function 1; vdpakit's lcore on CPU 0, the model's engine thread
# on the other CPU), next to the plain vhost-user software path measured in the same run
# (vdpakit's virtio-user txonly on CPU 0 into vdpakit's vhost-user rxonly on CPU 1). 64 B, one
# queue pair, split rings, alternating, ROUNDS times. The figure is the receiving port's rx Mpps.
#
# mlx5: queue objects over vdpakit's rings, steered by the model's flow table (promiscuous),
# doorbell = the queue index at the doorbell page, NO_MSIX (polled).
#
# Usage: benches/peer/pmd_model.sh [SECS=6] [ROUNDS=2] [KINDS="virtio ifc eni mlx5"]
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-6}
ROUNDS=${2:-2}
KINDS=${3:-"virtio ifc eni mlx5"}
cargo build --release -q -p vdpakit-apps
VK=target/release/vdpakit
work=$(mktemp -d /tmp/vk-bench-pmd.XXXXXX)
trap 'rm -rf "$work"' EXIT

mpps() { python3 -c "import json,sys; r=json.load(open('$1')); print('%.3f' % r['ports'][$2]['rx_mpps'])" 2>/dev/null || echo 0; }

pmd() {
    local kind=$1 extra=""
    [[ $kind == eni ]] && extra=",iova=va"
    # The lcore is pinned to CPU 0; the engine thread runs on the other CPU.
    taskset -c 0,1 "$VK" fwd --port "$kind:model=b,vfs=2,wire=cable,poll=busy$extra" \
        --port "$kind:model=b,vf=1$extra" --mode txonly,rxonly --cores 0 --rxd 1024 --txd 1024 \
        --stats-period 0 --start-delay 1 --duration "$SECS" --json >"$work/pmd.json" 2>"$work/pmd.err" || true
    mpps "$work/pmd.json" 1
}

software() {
    rm -f "$work/sock"
    taskset -c 1 "$VK" fwd --port "vhost-user:path=$work/sock" --mode rxonly --cores 1 \
        --stats-period 0 --start-delay 1 --duration "$SECS" --json >"$work/sw.json" 2>"$work/sw.err" &
    local B=$!
    sleep 0.3
    taskset -c 0 "$VK" fwd --port "virtio-user:path=$work/sock" --mode txonly --cores 0 \
        --stats-period 0 --duration $((SECS + 2)) >"$work/swf.log" 2>&1 &
    local F=$!
    wait $B || true
    kill $F 2>/dev/null || true
    wait $F 2>/dev/null || true
    mpps "$work/sw.json" 0
}

printf "%-8s %16s %16s %8s\n" kind "model pair Mpps" "vhost-user Mpps" ratio
for kind in $KINDS; do
    f=0; s=0
    for _ in $(seq "$ROUNDS"); do
        f=$(echo "$f + $(pmd "$kind")" | bc)
        s=$(echo "$s + $(software)" | bc)
    done
    f=$(echo "scale=3; $f / $ROUNDS" | bc); s=$(echo "scale=3; $s / $ROUNDS" | bc)
    r=$(echo "scale=3; if ($s > 0) $f / $s else 0" | bc)
    printf "%-8s %16s %16s %8s\n" "$kind" "$f" "$s" "$r"
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nproc) cores; load $(cut -d' ' -f1 /proc/loadavg); $(date -u +%F)"
