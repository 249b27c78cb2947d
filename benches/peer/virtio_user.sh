#!/usr/bin/env bash
# Side-by-side: DPDK's vhost-user front end (testpmd net_virtio_user) against vdpakit's
# (vdpakit fwd --port virtio-user:...), both driving the same back end, DPDK testpmd net_vhost.
# Then vdpakit's front end against vdpakit's back end (the figure the README quotes).
#
# Cases (64 B, one queue, one core per side): the front end transmits (txonly) into the back end
# (rxonly), and the back end transmits (txonly) into the front end (rxonly); split and packed
# rings. Runs alternate DPDK / vdpakit front end, ROUNDS times per case (median reported). The rate is measured the
# same way for both front ends: on the DPDK back end, testpmd's "show port stats" pps (Rx-pps of
# what it received, or Tx-pps of what the front end's receive ring accepted) after a warm-up.
#
# Usage: benches/peer/virtio_user.sh [SECS=8] [ROUNDS=5]   (root, hugepages, dpdk-dev installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-8}
ROUNDS=${2:-5}
WARM=3
. benches/peer/common.sh
work=$(mktemp -d /tmp/vk-bench-vu.XXXXXX)
trap 'pkill -f "file-prefix=vkv" 2>/dev/null; pkill -f "path=$work/sock" 2>/dev/null; rm -rf "$work"' EXIT

# DPDK back end on CPU 1, in the background (BE): $1 = forward mode. It listens; the front end
# is started once the socket exists. `measured` prints the averaged pps of the direction that
# counts once it has finished (after `wait $BE`).
backend() {
    local mode=$1
    { sleep 2; echo start; sleep $WARM; echo "show port stats 0"; sleep "$SECS"; echo "show port stats 0"; echo stop; sleep 0.5; echo quit; } |
        dpdk-testpmd --lcores '0@1,1@1' --no-pci --file-prefix=vkvb -m 256 --single-file-segments \
            --vdev "net_vhost0,iface=$work/sock,queues=1" -- -i --nb-cores=1 --no-mlockall \
            --forward-mode="$mode" --txd=1024 --rxd=1024 >"$work/be.log" 2>&1 &
    BE=$!
    for _ in $(seq 100); do [[ -S $work/sock ]] && break; sleep 0.1; done
}
measured() {
    local key
    [[ $1 == rxonly ]] && key=Rx-pps || key=Tx-pps
    grep -E "$key:" "$work/be.log" | tail -1 | awk '{print $2}' || true
}

# front end on CPU 0 in the background: $1 = dpdk|vdpakit, $2 = mode, $3 = packed (0|1)
frontend() {
    local kind=$1 mode=$2 packed=$3
    local run=$((WARM + SECS + 4))
    if [[ $kind == dpdk ]]; then
        { sleep 0.5; echo start; sleep "$run"; echo quit; } |
            dpdk-testpmd --lcores '0@0,1@0' --no-pci --file-prefix=vkvf -m 256 --single-file-segments \
                --vdev "net_virtio_user0,path=$work/sock,queues=1,packed_vq=$packed,mrg_rxbuf=1,in_order=0" \
                -- -i --nb-cores=1 --no-mlockall --forward-mode="$mode" --txd=1024 --rxd=1024 \
                >"$work/fe.log" 2>&1 &
    else
        taskset -c 0 "$VK" fwd --port "virtio-user:path=$work/sock,packed=$packed,mrg_rxbuf=1" \
            --mode "$mode" --cores 0 --stats-period 0 --duration "$run" >"$work/fe.log" 2>&1 &
    fi
    FE=$!
}

printf "%-8s %-22s %10s %10s %8s\n" ring direction "DPDK Mpps" "vdpakit" ratio
for packed in 0 1; do
    [[ $packed == 1 ]] && ring=packed || ring=split
    for dir in "front-end->back-end" "back-end->front-end"; do
        if [[ $dir == "front-end->back-end" ]]; then fe=txonly; be=rxonly; else fe=rxonly; be=txonly; fi
        declare -A all=([dpdk]="" [vdpakit]="")
        for _ in $(seq "$ROUNDS"); do
            for kind in dpdk vdpakit; do
                rm -f "$work/sock"
                backend $be
                frontend $kind $fe $packed
                wait $BE 2>/dev/null || true
                pps=$(measured $be)
                kill $FE 2>/dev/null || true; wait $FE 2>/dev/null || true
                all[$kind]+=" ${pps:-0}"
            done
        done
        report $ring "$dir" "${all[dpdk]}" "${all[vdpakit]}"
    done
done

# vdpakit front end against vdpakit back end, one core each: the back end's own count.
printf "\n%-8s %-22s %10s\n" ring direction "vdpakit<->vdpakit Mpps"
for packed in 0 1; do
    [[ $packed == 1 ]] && ring=packed || ring=split
    for dir in "front-end->back-end" "back-end->front-end"; do
        if [[ $dir == "front-end->back-end" ]]; then fe=txonly; be=rxonly; key=rx; else fe=rxonly; be=txonly; key=tx; fi
        rm -f "$work/sock"
        taskset -c 1 "$VK" fwd --port "vhost-user:path=$work/sock,packed=$packed" --mode $be --cores 1 \
            --stats-period 0 --start-delay 1 --duration $((SECS + 2)) --json >"$work/vbe.json" 2>"$work/vbe.err" &
        BE=$!
        sleep 0.3
        taskset -c 0 "$VK" fwd --port "virtio-user:path=$work/sock,packed=$packed" --mode $fe --cores 0 \
            --stats-period 0 --duration $((SECS + 3)) >"$work/vfe.log" 2>&1 &
        FE=$!
        wait $BE || true
        kill $FE 2>/dev/null || true; wait $FE 2>/dev/null || true
        mpps=$(python3 -c "import json,sys; r=json.load(open('$work/vbe.json')); print('%.3f' % r['ports'][0]['${key}_mpps'])" 2>/dev/null || echo 0)
        printf "%-8s %-22s %10s\n" $ring "$dir" "$mpps"
    done
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nproc) cores; $(date -u +%F)"
