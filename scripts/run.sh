#!/usr/bin/env bash
# The README's main job: build vdpakit and forward packets between two ring ports for 5 seconds,
# printing live Mpps lines and a summary. Reserves hugepages first when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -w /proc/sys/vm/nr_hugepages ]] && (( $(cat /proc/sys/vm/nr_hugepages) < 512 )); then
    echo 512 >/proc/sys/vm/nr_hugepages || true
fi
cargo build --release -q -p vdpakit-apps
cpus=$(nproc)
cores=0
(( cpus > 1 )) && cores=0-1
exec target/release/vdpakit fwd \
    --port ring:name=a,peer=b --port ring:name=b,peer=a \
    --mode io --cores "$cores" --duration "${DURATION:-5}" "$@"
