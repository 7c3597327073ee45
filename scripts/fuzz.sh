#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz / libFuzzer, nightly toolchain) of what a guest, a
# migration peer or an API client controls. The targets live in fuzz/ (its own cargo project):
#
#   migration_receive  the receiving side of the migration protocol (frames, Config and State
#                      JSON, Memory range tables and pages, MemoryFd entries)
#   balloon_queues     the balloon's inflate, deflate, stats, reporting and hint queues, driven
#                      through real virtqueues in guest memory
#   virtio_pci         the virtio-pci BAR (common and device config, ISR, notify, MSI-X) and
#                      state save/restore
#   pci_conf1          PCI configuration space through ports 0xCF8/0xCFC
#   api_request        the API server's HTTP request reader and JSON bodies
#
# Usage: scripts/fuzz.sh <seconds-per-target> [target...]
#
# Each target runs for the given time, seeded from fuzz/corpus/<target>/ (in git); what it
# learns goes to target/fuzz-corpus/<target>/ and anything it finds to
# target/fuzz-artifacts/<target>/ (both outside git). Prints per target the executions per
# second, the corpus size and the crashes/hangs found. Exit status 0 only when no target found
# a crash, a hang (an input running over 10 s) or an out-of-memory. Run it under `nice` on a
# shared machine. Reproduce an artifact with `cd fuzz && cargo +nightly fuzz run -O <target>
# <artifact>`.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in
    ''|*[!0-9]*) usage ;;
esac
seconds=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
all=(migration_receive balloon_queues virtio_pci pci_conf1 api_request)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: the nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd "$root/fuzz"
for t in "${targets[@]}"; do
    cargo +nightly fuzz build -O "$t"
done

failed=0
printf '%-18s %8s %10s %8s %8s  %s\n' target seconds exec/s corpus crashes result
summary=()
for t in "${targets[@]}"; do
    corpus="$root/target/fuzz-corpus/$t"
    artifacts="$root/target/fuzz-artifacts/$t"
    log="$root/target/fuzz-logs/$t.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    before=$(find "$artifacts" -type f | wc -l)
    start=$(date +%s)
    status=0
    cargo +nightly fuzz run -O "$t" "$corpus" "$root/fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    elapsed=$(( $(date +%s) - start ))
    after=$(find "$artifacts" -type f | wc -l)
    found=$((after - before))
    execs=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    units=$(find "$corpus" -type f | wc -l)
    result=ok
    if [ "$status" -ne 0 ] || [ "$found" -gt 0 ]; then
        result="FAILED (exit $status, see $log)"
        failed=1
    fi
    summary+=("$(printf '%-18s %8s %10s %8s %8s  %s' "$t" "$elapsed" "${execs:-?}" "$units" "$found" "$result")")
    echo "${summary[-1]}"
done
exit $failed
