#!/usr/bin/env bash
# Side-by-side: DPDK's vhost-user back end (testpmd net_vhost) against vdpakit's (vdpakit fwd
# --port vhost-user:...), both driven by the same front end, DPDK testpmd net_virtio_user.
#
# Cases (64 B, one queue, one core per side): the front end transmits and the back end only
# receives (rxonly), and the back end transmits (txonly) while the front end only receives;
# split and packed rings. Runs alternate DPDK / vdpakit, ROUNDS times per case. The rate is
# measured the same way for both back ends: on the front end, testpmd's "show port stats" pps
# averaged over SECS seconds after a warm-up; each side's figure is the median of its rounds.
#
# Usage: benches/peer/vhost_user.sh [SECS=8] [ROUNDS=5]   (root, hugepages, dpdk-dev installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-8}
ROUNDS=${2:-5}
WARM=3
. benches/peer/common.sh
work=$(mktemp -d /tmp/vk-bench.XXXXXX)
trap 'pkill -f "file-prefix=vkb" 2>/dev/null; rm -rf "$work"' EXIT

# front end: $1 = forward mode, $2 = devargs; prints the averaged pps of the direction that counts
frontend() {
    local mode=$1 dev=$2 key
    [[ $mode == txonly ]] && key=Tx-pps || key=Rx-pps
    { echo start; sleep $WARM; echo "show port stats 0"; sleep "$SECS"; echo "show port stats 0"; echo stop; sleep 0.5; echo quit; } |
        dpdk-testpmd --lcores '0@0,1@0' --no-pci --file-prefix=vkbf -m 256 --single-file-segments \
            --vdev "net_virtio_user0,path=$work/sock,queues=1,$dev" -- -i --nb-cores=1 --no-mlockall \
            --forward-mode="$mode" --txd=1024 --rxd=1024 >"$work/fe.log" 2>&1 || true
    grep -E "$key:" "$work/fe.log" | tail -1 | awk '{print $2}'
}

# back end: $1 = dpdk|vdpakit, $2 = mode; started in the background on CPU 1
backend() {
    local kind=$1 mode=$2
    rm -f "$work/sock"
    if [[ $kind == dpdk ]]; then
        { echo start; sleep $((WARM + SECS + 6)); echo quit; } |
            dpdk-testpmd --lcores '0@1,1@1' --no-pci --file-prefix=vkbb -m 256 --single-file-segments \
                --vdev "net_vhost0,iface=$work/sock,queues=1" -- -i --nb-cores=1 --no-mlockall \
                --forward-mode="$mode" --txd=1024 --rxd=1024 >"$work/be.log" 2>&1 &
    else
        taskset -c 1 "$VK" fwd --port "vhost-user:path=$work/sock" --mode "$mode" --cores 1 \
            --stats-period 0 --duration $((WARM + SECS + 6)) >"$work/be.log" 2>&1 &
    fi
    BE=$!
    for _ in $(seq 100); do [[ -S $work/sock ]] && break; sleep 0.1; done
}

printf "%-8s %-22s %10s %10s %8s\n" ring direction "DPDK Mpps" "vdpakit" ratio
for ring in split packed; do
    [[ $ring == packed ]] && dev="packed_vq=1,mrg_rxbuf=1,in_order=0" || dev="packed_vq=0,mrg_rxbuf=1,in_order=0"
    for dir in "virtio-user->backend" "backend->virtio-user"; do
        if [[ $dir == "virtio-user->backend" ]]; then fe=txonly; be=rxonly; else fe=rxonly; be=txonly; fi
        declare -A all=([dpdk]="" [vdpakit]="")
        for _ in $(seq "$ROUNDS"); do
            for kind in dpdk vdpakit; do
                backend $kind $be
                pps=$(frontend $fe "$dev")
                kill $BE 2>/dev/null || true; wait $BE 2>/dev/null || true
                all[$kind]+=" ${pps:-0}"
            done
        done
        report $ring "$dir" "${all[dpdk]}" "${all[vdpakit]}"
    done
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nproc) cores; $(date -u +%F)"
