#!/usr/bin/env bash
# The main job, on a fresh machine: builds the VMM and the test guest, boots a 4 GiB test guest
# (256 MiB of live data; 3 GiB written and freed again just before, as when a workload ends),
# migrates it locally with free page hints off, then migrates it on again with hints on, and
# prints the two migration reports side by side. The guest checks every live page itself
# after each move.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
[[ -e /dev/kvm ]] || { echo "demo: /dev/kvm is missing: the demo needs KVM" >&2; exit 1; }

echo "== building (cargo build --release, scripts/build-test-guest.sh)"
cargo build --release --quiet
guest=$(bash scripts/build-test-guest.sh 2>/dev/null | tail -n 1)
ch=$root/target/release/cloud-hypervisor
remote=$root/target/release/ch-remote

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
serial=$work/serial.log

start_vmm() { # name, then extra flags
    local name=$1; shift
    "$ch" --api-socket "$work/$name.sock" "$@" 2>>"$work/$name.err" &
    pids+=($!)
    eval "${name}_pid=$!"
    until [[ -S $work/$name.sock ]]; do sleep 0.05; done
}

last_seq() { grep -o '^guest: verify ok seq=[0-9]*' "$serial" | tail -n 1 | cut -d= -f2; }

wait_seq_above() { # seq, seconds
    local deadline=$((SECONDS + $2))
    while (( SECONDS < deadline )); do
        local s; s=$(last_seq || true)
        [[ -n $s && $s -gt $1 ]] && return 0
        sleep 0.1
    done
    echo "demo: the guest did not verify its memory again" >&2; return 1
}

migrate() { # from, to, send options, report file
    local from=$1 to=$2 opts=$3 out=$4
    start_vmm "$to"
    "$remote" --api-socket "$work/$to.sock" receive-migration "unix:$work/$to.migration" >/dev/null &
    local receiver=$!
    until [[ -S $work/$to.migration ]]; do sleep 0.05; done
    local before; before=$(last_seq)
    "$remote" --api-socket "$work/$from.sock" send-migration "destination_url=unix:$work/$to.migration$opts" >"$out"
    wait "$receiver"
    local pid_var="${to}_pid"
    awk '/^Rss:/ {printf "%.0f\n", $2 * 1024}' "/proc/${!pid_var}/smaps_rollup" >"$out.rss"
    wait_seq_above "$before" 20
    echo "   $from -> $to: the guest verified all its pages again (seq $(last_seq) > $before)"
}

echo "== booting a 4 GiB test guest: used=256 dirty=3072 (a workload that just ended)"
start=$(date +%s%N)
start_vmm a --kernel "$guest" --memory size=4G --cpus boot=1 \
    --cmdline "used=256 dirty=3072 hot=0" --balloon size=0,free_page_hinting=on \
    --serial "file=$serial"
until grep -q "^guest: verify ok" "$serial" 2>/dev/null; do
    kill -0 "$a_pid" 2>/dev/null || { echo "demo: the VMM exited" >&2; cat "$work/a.err" >&2; exit 1; }
    sleep 0.1
done
grep "^guest: ready" "$serial"
echo "   (VMM start to first verified pass: $(( ($(date +%s%N) - start) / 1000000 )) ms)"

echo "== migration 1: a -> b, free page hints off (zero pages still skipped)"
migrate a b ",free_page_hints=off" "$work/off.json"
echo "== migration 2: b -> c, free page hints on"
migrate b c "" "$work/on.json"
grep "^guest: hint " "$serial" | tail -n 1 | sed 's/^/   /'

echo
python3 - "$work/off.json" "$work/on.json" <<'PY'
import json, sys
off, on = (json.load(open(p)) for p in sys.argv[1:3])
rss = [int(open(p + ".rss").read().strip() or 0) for p in sys.argv[1:3]]
mib = lambda b: f"{b / 2**20:.1f}"
rows = [
    ("total time (ms)", lambda r: f"{r['total_ms']:.0f}"),
    ("downtime (ms)", lambda r: f"{r['downtime_ms']:.1f}"),
    ("memory rounds", lambda r: str(r["rounds"])),
    ("guest RAM (MiB)", lambda r: mib(r["memory_bytes"])),
    ("memory sent (MiB)", lambda r: mib(r["bytes_sent"])),
    ("on the wire (MiB)", lambda r: mib(r["wire_bytes"])),
    ("zero pages skipped", lambda r: str(r["zero_pages_skipped"])),
    ("hint mode", lambda r: r["hints"]["mode"]),
    ("hint wait (ms)", lambda r: f"{r['hints']['wait_ms']:.1f}"),
    ("pages hinted free", lambda r: str(r["hints"]["pages_hinted"])),
    ("pages left out of round 0", lambda r: str(r["hints"]["pages_skipped"])),
]
w = max(len(n) for n, _ in rows)
print(f"{'':{w}}  {'hints off':>12}  {'hints on':>12}")
for name, f in rows:
    print(f"{name:{w}}  {f(off):>12}  {f(on):>12}")
print(f"{'destination RSS (MiB)':{w}}  {mib(rss[0]):>12}  {mib(rss[1]):>12}")
if on["total_ms"] > 0:
    print(f"\nwith hints: {off['total_ms'] / on['total_ms']:.1f}x faster, "
          f"{off['bytes_sent'] / max(on['bytes_sent'], 1):.1f}x less memory sent")
PY

echo
"$remote" --api-socket "$work/c.sock" shutdown
if grep -q "verify FAILED" "$serial"; then
    echo "demo: the guest reported corrupted memory" >&2; exit 1
fi
echo "== done: three VMMs, two live migrations, no verification failure"
