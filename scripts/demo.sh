#!/usr/bin/env bash
# The main job, on a fresh machine: builds the VMM and the test guest, boots a 4 GiB test guest
# (256 MiB live data, 3 GiB written and freed again), shows it verifying its memory, drives it
# through the REST API with ch-remote, and shuts it down.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
[[ -e /dev/kvm ]] || { echo "demo: /dev/kvm is missing: the demo needs KVM" >&2; exit 1; }

echo "== building (cargo build --release, scripts/build-test-guest.sh)"
cargo build --release --quiet
guest=$(bash scripts/build-test-guest.sh 2>/dev/null | tail -n 1)
ch=target/release/cloud-hypervisor
remote=target/release/ch-remote

work=$(mktemp -d)
trap 'kill $vmm_pid 2>/dev/null || true; rm -rf "$work"' EXIT
api=$work/api.sock
serial=$work/serial.log

echo "== booting a 4 GiB test guest (used=256 dirty=3072)"
start=$(date +%s%N)
$ch --api-socket "$api" --kernel "$guest" --memory size=4G --cpus boot=1 \
    --cmdline "used=256 dirty=3072 hot=16" --serial "file=$serial" &
vmm_pid=$!
until grep -q "^guest: ready" "$serial" 2>/dev/null; do
    kill -0 $vmm_pid 2>/dev/null || { echo "demo: the VMM exited" >&2; exit 1; }
    sleep 0.1
done
ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
grep "^guest: ready" "$serial"
echo "   (VMM start to ready: ${ready_ms} ms)"
sleep 2
grep "^guest: verify" "$serial" | tail -n 2

echo "== ch-remote info"
$remote --api-socket "$api" info | python3 -c 'import json,sys; i=json.load(sys.stdin); print("state:", i["state"], " memory_actual_size:", i["memory_actual_size"])'
echo "== pause for 2 s, then resume"
$remote --api-socket "$api" pause
before=$(grep -c "^guest: verify ok" "$serial")
sleep 2
after=$(grep -c "^guest: verify ok" "$serial")
echo "   verify lines while paused: $((after - before))"
$remote --api-socket "$api" resume
sleep 2
grep "^guest: verify" "$serial" | tail -n 1
echo "== RSS of the VMM: $(( $(awk '/VmRSS/ {print $2}' /proc/$vmm_pid/status) / 1024 )) MiB for a 4 GiB guest"
echo "== ch-remote shutdown"
$remote --api-socket "$api" shutdown
wait $vmm_pid && echo "   VMM exited with 0"
grep -q "verify FAILED" "$serial" && { echo "demo: the guest reported corrupted memory" >&2; exit 1; }
echo "== done: no verification failures"
