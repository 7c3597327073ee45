#!/usr/bin/env bash
# Soak test of live migration: ping-pongs one test guest (tests/guest, with a hot set and free
# page hints on) between VMM processes for <hops> hops, alternating UNIX and TCP (and TLS every
# third hop with --tls), verifies the guest after every hop, and records the VMMs' RSS, thread
# count and descriptor count per hop.
#
# What "between two VMM processes" means here: a source VMM exits after a successful
# send-migration (as Cloud Hypervisor's does), so every hop starts a fresh receiving process and
# the guest moves on from it at the next hop. Per hop the script records
#   - the source VMM (the one holding the guest) just before it sends, and
#   - the destination VMM after the hop, once the guest has verified there (and a 1 s settle).
# "Must not grow" is checked on these per-hop numbers: from hop 2 on, the destination's threads
# and descriptors must equal hop 1's, and its RSS must stay within 5% (+ 4 MiB) of hop 1's (a fresh
# process fills the guest memory it receives, so RSS is compared with a tolerance, not equality);
# the same for the source numbers from hop 2 on against hop 2's (hop 1's source booted the guest).
#
# Usage: scripts/soak-migration.sh <hops> [options]
#   --size SIZE     guest RAM (default 1G); e.g. --size 256G for the large seccomp soak
#   --cmdline TEXT  guest command line (default "used=64 hot=16 dirty=256")
#   --tls           TLS every third hop (tcp with tls_dir=, certificates from
#                   scripts/make-test-certs.sh); refused with a message when this build's VMM has
#                   no tls_dir support; off by default
#   --seccomp MODE  the VMMs' --seccomp (default true)
#   --out DIR       where soak.csv, soak.json and the logs go (default: a new dir under $TMPDIR)
#   --no-build      use target/release as it is (default: cargo build --release first)
# Checks per hop: send-migration and receive-migration exit 0, the source exits 0, the guest's
# serial log shows a `verify ok` with a seq above the last one before the hop and no FAILED, and
# no VMM printed "forbidden syscall" (a seccomp kill) or "panicked". Calls the filters refused
# with EPERM (the VMM goes on) are recorded per hop from vm.counters.
# Prints one line per hop and a summary; exit 0 only when every hop and the growth check held.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hops=${1:-}
[[ $hops =~ ^[0-9]+$ && $hops -ge 1 ]] || {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
shift
size=1G cmdline="used=64 hot=16 dirty=256" tls=0 seccomp=true out="" build=1
die() { echo "soak: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --size) size=${2:?}; shift ;;
        --cmdline) cmdline=${2:?}; shift ;;
        --tls) tls=1 ;;
        --seccomp) seccomp=${2:?}; shift ;;
        --out) out=${2:?}; shift ;;
        --no-build) build=0 ;;
        *) die "unknown option $1" ;;
    esac
    shift
done

cd "$root"
if [[ $build == 1 ]]; then
    cargo build --release --quiet
fi
vmm_bin=$root/target/release/cloud-hypervisor
remote_bin=$root/target/release/ch-remote
guest=$(scripts/build-test-guest.sh | tail -n 1)
[[ -x $vmm_bin && -x $remote_bin && -f $guest ]] || die "binaries or test guest missing"

certs=""
if [[ $tls == 1 ]]; then
    if [[ ! -x scripts/make-test-certs.sh ]] || ! grep -q 'tls_dir' "$remote_bin" "$vmm_bin" 2>/dev/null; then
        die "--tls: this build has no tls_dir support (no scripts/make-test-certs.sh or tls_dir in the binaries)"
    fi
fi

[[ -n $out ]] || out=$(mktemp -d "${TMPDIR:-/tmp}/soak-migration.XXXXXX")
mkdir -p "$out"
if [[ $tls == 1 ]]; then
    certs=$out/certs
    scripts/make-test-certs.sh "$certs" >/dev/null
fi
serial=$out/serial.log
csv=$out/soak.csv
: >"$serial"
echo "hop,transport,ok,total_ms,downtime_ms,bytes_sent,pages_hinted,rounds,seq,src_rss_kib,src_threads,src_fds,dst_rss_kib,dst_threads,dst_fds,src_seccomp_refused,dst_seccomp_refused,hints_reason" >"$csv"

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
threads() { ls "/proc/$1/task" 2>/dev/null | wc -l; }
fds() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
usage() { echo "$(rss_kib "$1"),$(threads "$1"),$(fds "$1")"; }
# Calls the VMM's seccomp filters refused with EPERM so far (vm.counters); kills are checked apart.
refused() { "$remote_bin" --api-socket "$1" counters 2>/dev/null | jq -r '.seccomp.refused_calls // ""' 2>/dev/null || true; }
last_seq() { grep -a '^guest: verify ok seq=' "$serial" | sed 's/^guest: verify ok seq=\([0-9]*\).*/\1/' | sort -n | tail -1; }

# Starts a VMM; its pid in $vmm_pid. Arguments after the socket go to cloud-hypervisor.
start_vmm() {
    local sock=$1
    shift
    "$vmm_bin" --api-socket "$sock" --seccomp "$seccomp" "$@" \
        >>"$out/vmm-$(basename "$sock" .sock).log" 2>&1 &
    vmm_pid=$!
    pids+=("$vmm_pid")
    local i
    for i in $(seq 1 500); do
        [[ -S $sock ]] && return 0
        sleep 0.02
    done
    die "VMM on $sock did not start"
}

wait_seq_above() {
    local above=$1 timeout=$2 start=$SECONDS s
    while ((SECONDS - start < timeout)); do
        if grep -aq 'verify FAILED' "$serial"; then return 1; fi
        s=$(last_seq)
        if [[ -n $s && $s -gt $above ]]; then
            echo "$s"
            return 0
        fi
        sleep 0.2
    done
    return 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_listen() {
    local url=$1 i
    for i in $(seq 1 1000); do
        case $url in
            unix:*) grep -q "00010000 .* ${url#unix:}\$" /proc/net/unix && return 0 ;;
            tcp:*) ss -ltn "sport = :${url##*:}" | grep -q LISTEN && return 0 ;;
        esac
        sleep 0.02
    done
    return 1
}

echo "soak: $hops hops of a $size guest ($cmdline), seccomp=$seccomp, tls=$([[ $tls == 1 ]] && echo 'every third hop' || echo off); logs in $out" >&2
src_sock=$out/vmm-0.sock
start_vmm "$src_sock" --kernel "$guest" --memory "size=$size" --cmdline "$cmdline" \
    --balloon size=0,free_page_hinting=on --serial "file=$serial"
src_pid=$vmm_pid
ready_wait=$((60 + $(numfmt --from=iec "${size}" 2>/dev/null || echo 0) / (1 << 30) / 2))
wait_seq_above 0 "$ready_wait" >/dev/null || die "the guest never verified after boot"

failures=0
for hop in $(seq 1 "$hops"); do
    dst_sock=$out/vmm-$hop.sock
    if [[ $tls == 1 && $((hop % 3)) == 0 ]]; then
        transport=tls
        url="tcp:127.0.0.1:$(free_port)"
        recv_arg="receiver_url=$url,tls_dir=$certs"
        send_arg="destination_url=$url,tls_dir=$certs"
    elif ((hop % 2 == 1)); then
        transport=unix
        url="unix:$out/mig-$hop.sock"
        recv_arg="receiver_url=$url" send_arg="destination_url=$url"
    else
        transport=tcp
        url="tcp:127.0.0.1:$(free_port)"
        recv_arg="receiver_url=$url" send_arg="destination_url=$url"
    fi
    start_vmm "$dst_sock"
    dst_pid=$vmm_pid
    src_usage=$(usage "$src_pid")
    src_refused=$(refused "$src_sock")
    seq_before=$(last_seq)
    "$remote_bin" --api-socket "$dst_sock" receive-migration "$recv_arg" \
        >"$out/recv-$hop.json" 2>"$out/recv-$hop.err" &
    recv_pid=$!
    ok=1 why=""
    wait_listen "$url" || { ok=0 why="the receiver never listened"; }
    if [[ $ok == 1 ]] && ! "$remote_bin" --api-socket "$src_sock" send-migration "$send_arg" \
        >"$out/report-$hop.json" 2>"$out/send-$hop.err"; then
        ok=0 why="send-migration failed: $(head -c 300 "$out/send-$hop.err")"
    fi
    wait "$recv_pid" || { [[ $ok == 0 ]] || { ok=0 why="receive-migration failed: $(head -c 300 "$out/recv-$hop.err")"; }; }
    if [[ $ok == 1 ]]; then
        for _ in $(seq 1 500); do kill -0 "$src_pid" 2>/dev/null || break; sleep 0.02; done
        if kill -0 "$src_pid" 2>/dev/null; then
            ok=0 why="the source VMM did not exit after sending"
        elif ! wait "$src_pid"; then
            ok=0 why="the source VMM exited non-zero"
        fi
    fi
    seq=""
    if [[ $ok == 1 ]]; then
        seq=$(wait_seq_above "${seq_before:-0}" 60) || { ok=0 why="no verify ok above seq ${seq_before:-0} after the hop (or FAILED)"; }
    fi
    if grep -aq -e 'forbidden syscall' -e 'panicked' "$out"/vmm-*.log; then
        ok=0 why="a VMM was killed by seccomp or panicked: $(grep -ah -e 'forbidden syscall' -e 'panicked' "$out"/vmm-*.log | head -1)"
    fi
    sleep 1
    dst_usage=$(usage "$dst_pid")
    dst_refused=$(refused "$dst_sock")
    r=$out/report-$hop.json
    field() { jq -r "$1 // \"\"" "$r" 2>/dev/null || echo ""; }
    echo "$hop,$transport,$ok,$(field .total_ms),$(field .downtime_ms),$(field .bytes_sent),$(field .hints.pages_hinted),$(field .rounds),$seq,$src_usage,$dst_usage,$src_refused,$dst_refused,\"$(field .hints.reason | tr -d '",')\"" >>"$csv"
    if [[ $ok == 1 ]]; then
        echo "soak: hop $hop $transport ok: $(field .total_ms) ms, downtime $(field .downtime_ms) ms, hinted $(field .hints.pages_hinted) pages, seq $seq; src rss/threads/fds $src_usage -> dst $dst_usage" >&2
    else
        echo "soak: hop $hop $transport FAILED: $why" >&2
        failures=$((failures + 1))
        break
    fi
    src_pid=$dst_pid src_sock=$dst_sock
done

# Growth check and summary.
status=0
python3 - "$csv" "$out/soak.json" "$hops" "$failures" <<'PY' || status=$?
import csv, json, sys
path, out, hops, failures = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [r for r in csv.DictReader(open(path))]
ok_rows = [r for r in rows if r["ok"] == "1"]
problems = []
def check(side, first_hop):
    base = next((r for r in ok_rows if int(r["hop"]) == first_hop), None)
    if base is None:
        return {}
    b = {k: int(base[f"{side}_{k}"]) for k in ("rss_kib", "threads", "fds")}
    worst = dict(b)
    for r in ok_rows:
        if int(r["hop"]) <= first_hop:
            continue
        for k in ("threads", "fds"):
            v = int(r[f"{side}_{k}"])
            worst[k] = max(worst[k], v)
            if v != b[k]:
                problems.append(f"hop {r['hop']}: {side} {k} {v} != {b[k]} at hop {first_hop}")
        v = int(r[f"{side}_rss_kib"])
        worst["rss_kib"] = max(worst["rss_kib"], v)
        if v > b["rss_kib"] * 1.05 + 4096:
            problems.append(f"hop {r['hop']}: {side} RSS {v} KiB grew past {b['rss_kib']} KiB at hop {first_hop}")
    return {"baseline_hop": first_hop, "baseline": b, "max": worst,
            "growth": {k: worst[k] - b[k] for k in b}}
summary = {
    "hops_requested": hops, "hops_ok": len(ok_rows), "failures": failures,
    "transports": {t: sum(1 for r in ok_rows if r["transport"] == t) for t in ("unix", "tcp", "tls")},
    "destination": check("dst", 1), "source": check("src", 2),
    # Hints are asked for on every hop; a hop without them (the report says why) still counts.
    "seccomp_refused_calls_max": max((int(r[k] or 0) for r in ok_rows
                                      for k in ("src_seccomp_refused", "dst_seccomp_refused")), default=0),
    "hops_without_hints": {r["hop"]: r["hints_reason"] for r in ok_rows if r["pages_hinted"] in ("", "0")},
    "total_ms_max": max((float(r["total_ms"] or 0) for r in ok_rows), default=0),
    "downtime_ms_max": max((float(r["downtime_ms"] or 0) for r in ok_rows), default=0),
    "growth_problems": problems,
}
summary["ok"] = failures == 0 and len(ok_rows) == hops and not problems
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps(summary, indent=1))
sys.exit(0 if summary["ok"] else 1)
PY
echo "soak: $([[ $status == 0 ]] && echo ok || echo FAILED): $out/soak.csv, $out/soak.json" >&2
exit $status
