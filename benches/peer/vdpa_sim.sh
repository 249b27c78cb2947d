#!/usr/bin/env bash
# The vDPA framework's own overhead: `vdpakit fwd` over a `sim` VF pair joined by a cable
# (`vdpakit vdpa --device sim:...,vfs=2,wire=cable`, one engine thread doing the device's work),
# next to the plain vhost-user software path (vdpakit's virtio-user into vdpakit's vhost-user
# back end) on the same run. 64 B, one queue, split and packed, alternating, ROUNDS times.
#
# Framework: one `vdpakit fwd` process with two virtio-user ports (txonly on VF0's socket, rxonly
# on VF1's) on CPU 0; the sim engine on CPU 1. Software path: virtio-user txonly on CPU 0,
# vhost-user rxonly on CPU 1. The figure is the receiving port's rx Mpps.
#
# Usage: benches/peer/vdpa_sim.sh [SECS=8] [ROUNDS=2]   (hugepages help; 4 KiB pages also work)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-8}
ROUNDS=${2:-2}
cargo build --release -q -p vdpakit-apps
VK=target/release/vdpakit
work=$(mktemp -d /tmp/vk-bench-vdpa.XXXXXX)
trap 'pkill -f "$work" 2>/dev/null; rm -rf "$work"' EXIT

mpps() { python3 -c "import json,sys; r=json.load(open('$1')); print('%.3f' % r['ports'][$2]['rx_mpps'])" 2>/dev/null || echo 0; }

framework() {
    local packed=$1
    rm -f "$work"/vdpa*
    taskset -c 1 "$VK" vdpa --device "sim:name=b,vfs=2,wire=cable,poll=busy" --iface "$work/vdpa" \
        >"$work/vdpa.log" 2>&1 &
    local V=$!
    for _ in $(seq 100); do [[ -S $work/vdpa1 ]] && break; sleep 0.1; done
    taskset -c 0 "$VK" fwd --port "virtio-user:path=$work/vdpa0,packed=$packed" \
        --port "virtio-user:path=$work/vdpa1,packed=$packed" --mode txonly,rxonly --cores 0 \
        --stats-period 0 --start-delay 1 --duration "$SECS" --json >"$work/fw.json" 2>"$work/fw.err" || true
    kill -INT $V 2>/dev/null || true; wait $V 2>/dev/null || true
    mpps "$work/fw.json" 1
}

software() {
    local packed=$1
    rm -f "$work/sock"
    taskset -c 1 "$VK" fwd --port "vhost-user:path=$work/sock,packed=$packed" --mode rxonly --cores 1 \
        --stats-period 0 --start-delay 1 --duration "$SECS" --json >"$work/sw.json" 2>"$work/sw.err" &
    local B=$!
    sleep 0.3
    taskset -c 0 "$VK" fwd --port "virtio-user:path=$work/sock,packed=$packed" --mode txonly --cores 0 \
        --stats-period 0 --duration $((SECS + 2)) >"$work/swf.log" 2>&1 &
    local F=$!
    wait $B || true
    kill $F 2>/dev/null || true; wait $F 2>/dev/null || true
    mpps "$work/sw.json" 0
}

printf "%-8s %14s %14s %8s\n" ring "sim VF pair" "vhost-user sw" ratio
for packed in 0 1; do
    [[ $packed == 1 ]] && ring=packed || ring=split
    f=0; s=0
    for _ in $(seq "$ROUNDS"); do
        f=$(echo "$f + $(framework $packed)" | bc)
        s=$(echo "$s + $(software $packed)" | bc)
    done
    f=$(echo "scale=3; $f / $ROUNDS" | bc); s=$(echo "scale=3; $s / $ROUNDS" | bc)
    r=$(echo "scale=3; if ($s > 0) $f / $s else 0" | bc)
    printf "%-8s %14s %14s %8s\n" $ring "$f" "$s" "$r"
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nproc) cores; $(date -u +%F)"
