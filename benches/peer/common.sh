# Sourced by the side-by-side peer scripts: checks for testpmd, reserves hugepages, builds the
# release binary (VK), and offers `median` and `report` for the per-case figures.
command -v dpdk-testpmd >/dev/null || { echo "dpdk-testpmd not found: apt-get install dpdk-dev" >&2; exit 2; }
grep -q " hugetlbfs " /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages; }
(( $(cat /proc/sys/vm/nr_hugepages) >= 512 )) || echo 512 > /proc/sys/vm/nr_hugepages
cargo build --release -q -p vdpakit-apps
VK=target/release/vdpakit

# median V1 V2 ...: the middle value (the lower middle one for an even count). These machines
# are shared and their rates are bimodal (a run lands at 10 or at 15 Mpps), so a mean of a few
# rounds moves with how many runs hit the slow mode; the median of both sides, taken over the
# same alternating rounds, is the figure compared.
median() {
    printf "%s\n" "$@" | sort -n | awk '{v[NR]=$1} END {print (NR ? v[int((NR + 1) / 2)] : 0)}'
}

# report RING DIRECTION "DPDK pps values" "vdpakit pps values": one line with both medians
# (Mpps), their ratio, and every round's Mpps.
report() {
    local d v r
    d=$(median $3); v=$(median $4)
    r=$(echo "scale=3; if ($d > 0) $v / $d else 0" | bc)
    printf "%-8s %-22s %10s %10s %8s   (rounds: DPDK %s | vdpakit %s)\n" "$1" "$2" \
        "$(echo "scale=3; $d / 1000000" | bc)" "$(echo "scale=3; $v / 1000000" | bc)" "$r" \
        "$(for x in $3; do printf "%.1f " "$(echo "$x / 1000000" | bc -l)"; done)" \
        "$(for x in $4; do printf "%.1f " "$(echo "$x / 1000000" | bc -l)"; done)"
}
