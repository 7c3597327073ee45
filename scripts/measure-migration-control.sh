#!/usr/bin/env bash
# What watching a migration costs, and what the event monitor writes: for each of --runs runs,
# boots the test guest (2 GiB, used=128 dirty=1536, balloon with free page hinting) twice and
# migrates it to a fresh destination each time,
#   quiet:  `send-migration --no-wait`, the end seen in the event monitor file (no API calls);
#   polled: `ch-remote send-migration`, which reads vm.migration-progress every 100 ms,
# and prints per run the report's total_ms and rounds, the source's and destination's
# migration-* event lines, and a cancel's round trip (`ch-remote migration-cancel` in round 0
# of a hint-less migration of the same guest).
#
# Usage: scripts/measure-migration-control.sh [--runs N] [--bin DIR] [--args OPTS]
#   --runs N     repetitions (default 2)
#   --bin DIR    where cloud-hypervisor and ch-remote are (default target/debug, built first)
#   --args OPTS  extra send-migration options (default zero_pages=off,free_page_hints=off, so
#                that round 0 sends all 2 GiB and the migration lasts seconds)
set -euo pipefail

runs=2
bin=""
extra="zero_pages=off,free_page_hints=off"
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --args) extra=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --quiet)
    bin="$root/target/debug"
fi
guest=$("$root/scripts/build-test-guest.sh" | tail -n 1)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

wait_for() { # file pattern seconds
    local i=0
    until grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt $(($3 * 20)) ] && { echo "timed out waiting for $2 in $1" >&2; exit 1; }
        sleep 0.05
    done
}

# boot_pair <dir>: source and destination VMMs with event monitors, receive started.
boot_pair() {
    local d=$1
    mkdir -p "$d"
    "$bin/cloud-hypervisor" --api-socket "$d/src.sock" --kernel "$guest" --memory size=2G \
        --cmdline "used=128 dirty=1536" --serial "file=$d/serial.log" \
        --balloon size=0,free_page_hinting=on --event-monitor "path=$d/src.events" \
        2>"$d/src.err" &
    "$bin/cloud-hypervisor" --api-socket "$d/dst.sock" --event-monitor "path=$d/dst.events" \
        2>"$d/dst.err" &
    wait_for "$d/serial.log" "verify ok" 120
    "$bin/ch-remote" --api-socket "$d/dst.sock" receive-migration "unix:$d/mig.sock" >/dev/null &
    until [ -S "$d/mig.sock" ]; do sleep 0.02; done
}

finish_pair() {
    local d=$1
    "$bin/ch-remote" --api-socket "$d/dst.sock" shutdown >/dev/null 2>&1 ||
        "$bin/ch-remote" --api-socket "$d/dst.sock" shutdown-vmm >/dev/null 2>&1 || true
    wait || true
}

summary() { # label dir report-json
    local total
    total=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["total_ms"], r["rounds"])' "$3")
    printf '%-7s total_ms=%s rounds=%s src_events=%s dst_events=%s\n' "$1" \
        "${total% *}" "${total#* }" \
        "$(grep -c '"event":"migration-' "$2/src.events")" \
        "$(grep -c '"event":"migration-' "$2/dst.events")"
}

for run in $(seq 1 "$runs"); do
    d="$work/quiet-$run"
    boot_pair "$d"
    "$bin/ch-remote" --api-socket "$d/src.sock" send-migration --no-wait \
        "destination_url=unix:$d/mig.sock,$extra" >/dev/null
    wait_for "$d/src.events" '"event":"migration-\(completed\|failed\|cancelled\)"' 300
    "$bin/ch-remote" --api-socket "$d/src.sock" migration-progress |
        python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["report"]))' >"$d/report.json"
    summary quiet "$d" "$d/report.json"
    finish_pair "$d"

    d="$work/polled-$run"
    boot_pair "$d"
    "$bin/ch-remote" --api-socket "$d/src.sock" send-migration \
        "destination_url=unix:$d/mig.sock,$extra" >"$d/report.json"
    summary polled "$d" "$d/report.json"
    finish_pair "$d"

    d="$work/cancel-$run"
    boot_pair "$d"
    "$bin/ch-remote" --api-socket "$d/src.sock" send-migration --no-wait \
        "destination_url=unix:$d/mig.sock,zero_pages=off,free_page_hints=off" >/dev/null
    wait_for "$d/src.events" '"event":"migration-round"' 60
    sleep 0.5
    start=$(date +%s%N)
    "$bin/ch-remote" --api-socket "$d/src.sock" migration-cancel >/dev/null
    end=$(date +%s%N)
    printf 'cancel  round trip %d ms (round 0), src_events=%s dst_events=%s\n' \
        $(((end - start) / 1000000)) \
        "$(grep -c '"event":"migration-' "$d/src.events")" \
        "$(grep -c '"event":"migration-' "$d/dst.events")"
    "$bin/ch-remote" --api-socket "$d/src.sock" shutdown >/dev/null
    finish_pair "$d"
done
