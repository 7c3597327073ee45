#!/usr/bin/env bash
# Transport benchmark: the same guest migrated over loopback TCP in plain text and over TLS
# (tls_dir=, certificates from scripts/make-test-certs.sh), and over 1, 2 and 4 connections
# (connections=), in one run, variants interleaved run by run so machine noise hits all alike.
#
#   scripts/bench-transport.sh [--used MIB] [--mem SIZE] [--runs N] [--variants LIST]
#                              [--out FILE] [--no-build] [--keep-logs]
#
#   --used MIB      the test guest's live data (default 2048): the bytes dominate the time
#   --mem SIZE      guest RAM (default 3G); no balloon, so no hints: round 0 is the live data
#   --runs N        runs of every variant (default 2; the table shows medians)
#   --variants L    comma list among tcp, tls, tcp2, tcp4, tls2, tls4
#                   (default tcp,tls,tcp2,tcp4,tls4)
#   --out FILE      JSON rows (default ./bench-transport.json)
#   --no-build      use target/release as it is
#   --keep-logs     keep the per-run directories
#
# Every row: variant, run, connections, tls, total_ms, downtime_ms, round0_send_ms, bytes_sent,
# wire_bytes, round0_mib_s (round 0's guest bytes / its send time: the transport's throughput),
# integrity (the guest's own verification after the switch-over: ok or FAILED).
# Exits non-zero if any run failed or any integrity check did not pass.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
used=2048 mem=3G runs=2 variants=tcp,tls,tcp2,tcp4,tls4 out=bench-transport.json build=1 keep=0
die() { echo "bench-transport: $*" >&2; exit 1; }
say() { echo "bench-transport: $*" >&2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --used) used=${2:?}; shift ;;
        --mem) mem=${2:?}; shift ;;
        --runs) runs=${2:?}; shift ;;
        --variants) variants=${2:?}; shift ;;
        --out) out=${2:?}; shift ;;
        --no-build) build=0 ;;
        --keep-logs) keep=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

if [[ $build == 1 ]]; then
    (cd "$root" && cargo build --release --quiet) || die "cargo build --release failed"
fi
ch=$root/target/release/cloud-hypervisor
remote=$root/target/release/ch-remote
[[ -x $ch && -x $remote ]] || die "no release binaries (drop --no-build)"
guest=$("$root/scripts/build-test-guest.sh" | tail -n 1)
[[ -f $guest ]] || die "no test guest"

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-transport.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ $keep == 1 ]] && say "logs kept in $work" || rm -rf "$work"
}
trap cleanup EXIT
"$root/scripts/make-test-certs.sh" "$work/tls" >/dev/null || die "make-test-certs.sh failed"

wait_for() { # file pattern seconds
    local deadline=$((SECONDS + $3))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}
last_seq() { grep -o 'verify ok seq=[0-9]*' "$1" 2>/dev/null | tail -n 1 | cut -d= -f2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

rows=()
failed=0
one_run() { # variant run
    local variant=$1 run=$2 n=1 tls=""
    case $variant in
        tcp) ;; tls) tls=1 ;;
        tcp[0-9]*) n=${variant#tcp} ;;
        tls[0-9]*) n=${variant#tls}; tls=1 ;;
        *) die "unknown variant $variant" ;;
    esac
    local dir=$work/$variant-$run
    mkdir -p "$dir"
    "$ch" --api-socket "$dir/src.sock" --kernel "$guest" --memory "size=$mem" \
        --cmdline "used=$used" --serial "file=$dir/serial.log" >"$dir/src.out" 2>&1 &
    local src=$!
    pids+=("$src")
    wait_for "$dir/serial.log" "verify ok" 300 || { say "$variant run $run: guest not ready"; return 1; }
    "$ch" --api-socket "$dir/dst.sock" >"$dir/dst.out" 2>&1 &
    local dst=$!
    pids+=("$dst")
    local port
    port=$(free_port)
    local url="tcp:127.0.0.1:$port" opts=""
    [[ -n $tls ]] && opts=",tls_dir=$work/tls"
    for _ in $(seq 100); do [[ -S $dir/dst.sock ]] && break; sleep 0.05; done
    "$remote" --api-socket "$dir/dst.sock" receive-migration "receiver_url=$url$opts" \
        >"$dir/recv.out" 2>&1 &
    local recv=$!
    for _ in $(seq 200); do
        ss -ltn 2>/dev/null | grep -q ":$port " && break
        sleep 0.05
    done
    local before
    before=$(last_seq "$dir/serial.log")
    if ! "$remote" --api-socket "$dir/src.sock" send-migration \
        "destination_url=$url$opts,connections=$n" >"$dir/report.json" 2>"$dir/send.err"; then
        say "$variant run $run: send-migration failed: $(cat "$dir/send.err")"
        kill "$src" "$dst" 2>/dev/null || true
        return 1
    fi
    wait "$recv" || true
    local integrity=FAILED deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)); do
        if grep -q "verify FAILED" "$dir/serial.log"; then break; fi
        local now
        now=$(last_seq "$dir/serial.log")
        if [[ -n $now && $now -gt ${before:-0} ]]; then integrity=ok; break; fi
        sleep 0.2
    done
    kill "$src" "$dst" 2>/dev/null || true
    wait "$src" "$dst" 2>/dev/null || true
    rows+=("$(python3 - "$dir/report.json" "$variant" "$run" "$integrity" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get("transport") or {}
p = r.get("phases") or {}
send_ms = p.get("round0_send_ms") or 0.0
# All bytes over round 0's send time: the later rounds of a guest without hot data are a few
# pages, so this is round 0's throughput within a fraction of a percent.
mib_s = r["bytes_sent"] / 2**20 / (send_ms / 1000) if send_ms else 0.0
print(json.dumps({
    "variant": sys.argv[2], "run": int(sys.argv[3]),
    "connections": t.get("connections"), "tls": t.get("tls"),
    "total_ms": r["total_ms"], "downtime_ms": r["downtime_ms"],
    "round0_send_ms": send_ms, "bytes_sent": r["bytes_sent"], "wire_bytes": r["wire_bytes"],
    "rounds": r["rounds"], "round0_mib_s": round(mib_s, 1), "integrity": sys.argv[4],
}))
PY
)")
    [[ $integrity == ok ]] || { say "$variant run $run: integrity $integrity"; return 1; }
}

IFS=, read -r -a list <<<"$variants"
for run in $(seq "$runs"); do
    for variant in "${list[@]}"; do
        say "run $run: $variant"
        one_run "$variant" "$run" || failed=1
    done
done

printf '%s\n' "${rows[@]}" | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
json.dump(rows, open(sys.argv[1], "w"), indent=1)
' "$out"
python3 - "$out" <<'PY'
import json, statistics, sys
rows = json.load(open(sys.argv[1]))
order = []
for r in rows:
    if r["variant"] not in order:
        order.append(r["variant"])
med = lambda v, k: statistics.median(r[k] for r in rows if r["variant"] == v)
base = med("tcp", "round0_mib_s") if "tcp" in order else None
print(f"{'variant':8} {'conns':>5} {'tls':>5} {'runs':>4} {'total_ms':>9} {'round0_ms':>9} "
      f"{'MiB sent':>8} {'MiB/s':>7} {'vs tcp':>7} integrity")
for v in order:
    rs = [r for r in rows if r["variant"] == v]
    mib_s = med(v, "round0_mib_s")
    ratio = f"{mib_s / base:.2f}" if base else "-"
    print(f"{v:8} {rs[0]['connections']:>5} {str(rs[0]['tls']).lower():>5} {len(rs):>4} "
          f"{med(v, 'total_ms'):>9.0f} {med(v, 'round0_send_ms'):>9.0f} "
          f"{med(v, 'bytes_sent') / 2**20:>8.0f} {mib_s:>7.0f} {ratio:>7} "
          f"{','.join(sorted(set(r['integrity'] for r in rs)))}")
print(f"(medians; MiB/s = guest bytes sent / round 0 send time; {sys.argv[1]})")
PY
exit $failed
