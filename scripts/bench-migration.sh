#!/usr/bin/env bash
# The migration benchmark of our VMM: live migration of the test guest (tests/guest) between two
# cloud-hypervisor processes, with free page hinting on and off, next to what Cloud Hypervisor does
# today (all of RAM). The workloads, options and JSON rows mirror scripts/bench-qemu.sh, so both
# tables can be read side by side (bench_report.py table bench-migration.json bench-qemu.json).
#
# For each size x case x transport x run x mode it boots the test guest in a source VMM
# (--balloon size=0,free_page_hinting=on), waits for `guest: ready` and the first `guest: verify ok`,
# starts a destination VMM (--api-socket only) with `ch-remote receive-migration`, runs
# `ch-remote send-migration` and keeps its report JSON, reads the destination's RSS, checks that the
# serial log (the destination appends to the source's) shows a `guest: verify ok` with a seq above
# the last one before the switch-over and no FAILED, shuts both down, then measures the raw
# bandwidth of the same transport for that row's bytes (vm-migration's raw_bandwidth example).
#
# Usage: scripts/bench-migration.sh [options]
#   --sizes 1,2,4,8        guest RAM sizes in GiB (default 1,2,4,8; --size is an alias; a row is
#                          skipped, with a message, when MemAvailable < what the source holds +
#                          what it sends + 1 GiB: all of RAM for mode full, the live data with
#                          hints, the workload's memory otherwise)
#   --size-sweep [LIST]    time against RAM size: sizes LIST (default 8,64,256), cases idle,ended,
#                          unix, modes zero,hints,noballoon, 1 run, and the sizes chart and table
#                          (bench_report.py sizes); other options given after it still apply
#   --cases idle,ended,hot workloads (default all three):
#                            idle:  used=256                              migrated right after ready
#                            ended: used=256 dirty=<RAM-768MiB>           most of RAM written, then freed
#                            hot:   used=256 dirty=<RAM-768MiB> hot=64    plus 64 MiB rewritten throughout
#                          dirty is capped at BENCH_DIRTY_MAX_MIB (default 7424, what an 8 GiB guest
#                          writes), so larger guests run the same workload in more RAM
#   --transports unix,tcp  (default both)      --transport is an alias
#   --modes full,zero,hints  (default all three)
#                            full:  zero_pages=off,free_page_hints=off   all of RAM (Cloud Hypervisor today)
#                            zero:  free_page_hints=off                  zero-page skipping only (QEMU without hints)
#                            hints: defaults                             free page hints + zero-page skipping
#                            ranges: as hints, with the guest on hint=ranges (whatever --hint says)
#                            noballoon: defaults, the source without a balloon device at all
#   --hint stock|ranges    the guest balloon driver's answer to a hint request (default stock);
#                          with ranges, the hints rows are labelled mode "ranges"
#   --runs N               repetitions of every row (default 3; tables show medians)
#   --quick                1 GiB, unix, ended only, 1 run
#   --out FILE             JSON file of the rows (default ./bench-migration.json; replaced unless --append)
#   --append               add the rows to --out instead of replacing it
#   --png FILE             chart via bench_report.py chart (default ./bench-migration.png); with
#                          more than one size also FILE-sizes.png (total time against RAM size)
#   --no-chart             no chart
#   --guest ELF            test guest ELF (default: built by scripts/build-test-guest.sh)
#   --cpus N               guest vCPUs (default 1; with 2 the hot loop runs on the second one)
#   --no-build             use target/release as it is (default: cargo build --release first)
#   --keep-logs            keep the per-run directories (serial logs, VMM output) under $TMPDIR
#   --no-table             do not print the table and the ratios at the end
#   --tls-and-connections [ARGS]  instead of all the above: plain TCP vs TLS, and 1 vs 2 vs 4
#                          connections, on one large guest (scripts/bench-transport.sh ARGS)
# Environment: BENCH_MIGRATE_TIMEOUT_S (default 120 + 30 per GiB), BENCH_VERIFY_WAIT_S (default 10),
# BENCH_GUEST_EXTRA (appended to the guest command line, e.g. "selftest=corrupt" to see a FAILED row),
# BENCH_PYTHON (python for the chart; default python3, or a venv under target/ with matplotlib).
#
# Each row (one JSON object in the array of --out):
#   {"vmm":"ours","case":..,"mem_gib":..,"transport":..,"mode":..,"run":..,"total_ms":..,
#    "downtime_ms":..,"bytes_sent":..,"wire_bytes":..,"zero_pages_skipped":..,"hint_wait_ms":..,
#    "pages_hinted":..,"pages_skipped":..,"rounds":..,"dest_rss_bytes":..,"raw_bw_bytes_per_s":..,
#    "integrity":"ok"|"FAILED"|"unknown", "pages_unpopulated":.., "phases":{..}, ...}
# The first fields come from send-migration's report; dest_rss_bytes is Rss from
# /proc/<dest pid>/smaps_rollup (the whole VMM process) right after send-migration returned;
# raw_bw_bytes_per_s is `raw_bandwidth <transport> <max(bytes_sent, 64 MiB)> fresh4k`, run once
# the pair is gone. Extra fields: status, memory_bytes, pages_sent, hints_used, hints_mode,
# hint_cmd_id, hints_rejected, used_mib, hot_mib, downtime_breakdown (the report's object, when the
# VMM gives one), dest_guest_rss_bytes (the guest RAM mapping alone),
# dest_rss_after_verify_bytes, seq_before, src_last_seq, dst_seq, src_exited, dst_exit, raw_bw_bytes,
# raw_bw_seconds, cpus, cmdline, guest_hint, host_thp, commit, tree_modified, date.
# Times vary from run to run on a shared 2-core machine (the spinning guest vCPU, the migration
# thread and the destination's first touch of fresh memory share two cores): read the medians.
# Only one VMM pair runs at a time; both are always killed (also on Ctrl-C and errors).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sizes=1,2,4,8 cases=idle,ended,hot transports=unix,tcp modes=full,zero,hints runs=3
out=bench-migration.json png=bench-migration.png chart=1 append=0 guest="" cpus=1 hint=stock
build=1 keep=0 table=1 sweep=0

die() { echo "bench-migration: $*" >&2; exit 1; }
say() { echo "bench-migration: $*" >&2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --sizes|--size) sizes=${2:?}; shift ;;
        --size-sweep)
            sweep=1 sizes=8,64,256 cases=idle,ended transports=unix modes=zero,hints,noballoon runs=1
            if [[ ${2:-} =~ ^[0-9,]+$ ]]; then sizes=$2; shift; fi ;;
        --cases) cases=${2:?}; shift ;;
        --transports|--transport) transports=${2:?}; shift ;;
        --modes) modes=${2:?}; shift ;;
        --hint) hint=${2:?}; shift ;;
        --runs) runs=${2:?}; shift ;;
        --quick) sizes=1 transports=unix cases=ended runs=1 ;;
        --out) out=${2:?}; shift ;;
        --append) append=1 ;;
        --png) png=${2:?}; shift ;;
        --no-chart) chart=0 ;;
        --guest) guest=${2:?}; shift ;;
        --cpus) cpus=${2:?}; shift ;;
        --no-build) build=0 ;;
        --keep-logs) keep=1 ;;
        --no-table) table=0 ;;
        # Transport section: plain TCP vs TLS and 1/2/4 connections (scripts/bench-transport.sh,
        # which takes the rest of the arguments).
        --tls-and-connections) shift; exec "$root/scripts/bench-transport.sh" "$@" ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number"
[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus wants a positive number"
[[ $hint =~ ^(stock|ranges)$ ]] || die "--hint wants stock or ranges"
IFS=, read -ra size_list <<<"$sizes"
IFS=, read -ra case_list <<<"$cases"
IFS=, read -ra transport_list <<<"$transports"
IFS=, read -ra mode_list <<<"$modes"
for s in "${size_list[@]}"; do [[ $s =~ ^[1-9][0-9]*$ ]] || die "bad size '$s' (GiB, e.g. --sizes 1,2,4)"; done
for c in "${case_list[@]}"; do [[ $c =~ ^(idle|ended|hot)$ ]] || die "bad case '$c' (idle, ended, hot)"; done
for t in "${transport_list[@]}"; do [[ $t =~ ^(unix|tcp)$ ]] || die "bad transport '$t' (unix, tcp)"; done
for m in "${mode_list[@]}"; do [[ $m =~ ^(full|zero|hints|ranges|noballoon)$ ]] || die "bad mode '$m' (full, zero, hints, ranges, noballoon)"; done
[[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is not usable"
command -v python3 >/dev/null || die "python3 is needed"
case $out in /*) ;; *) out="$PWD/$out" ;; esac
case $png in /*|"") ;; *) png="$PWD/$png" ;; esac

cd "$root"
if [[ $build == 1 ]]; then
    say "cargo build --release (VMM, ch-remote, raw_bandwidth)"
    cargo build --release --quiet || die "cargo build --release failed"
    cargo build --release --quiet -p vm-migration --example raw_bandwidth || die "building raw_bandwidth failed"
fi
for b in target/release/cloud-hypervisor target/release/ch-remote target/release/examples/raw_bandwidth; do
    [[ -x $b ]] || die "$b is missing (run without --no-build)"
done
if [[ -z $guest ]]; then
    guest=$("$root/scripts/build-test-guest.sh" | tail -n1) || die "building the test guest failed"
fi
[[ -f $guest ]] || die "guest ELF $guest not found"
thp=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || true)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
tree_modified=false
if [[ -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]]; then tree_modified=true; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-migration.XXXXXX")
# Private copies: other people may rebuild target/release while this runs.
mkdir -p "$work/bin"
cp target/release/cloud-hypervisor target/release/ch-remote target/release/examples/raw_bandwidth "$work/bin/"
cp "$guest" "$work/bin/test-guest"
ch=$work/bin/cloud-hypervisor remote=$work/bin/ch-remote rawbw=$work/bin/raw_bandwidth guest_elf=$work/bin/test-guest

src_pid="" dst_pid="" rcv_pid="" send_pid=""
stop_pair() {
    local p
    for p in $send_pid $rcv_pid $src_pid $dst_pid; do kill "$p" 2>/dev/null || true; done
    for p in $send_pid $rcv_pid $src_pid $dst_pid; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    src_pid="" dst_pid="" rcv_pid="" send_pid=""
}
cleanup() {
    stop_pair
    if [[ $keep == 1 ]]; then say "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# true once something listens on 127.0.0.1:PORT (read from /proc, so no connection is made)
tcp_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp 2>/dev/null
}
avail_mib() { awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo; }
# dirty MiB of the ended and hot cases at GIB GiB of RAM
dirty_mib() {
    local d=$(($1 * 1024 - 768)) cap=${BENCH_DIRTY_MAX_MIB:-7424}
    ((d > cap)) && d=$cap
    ((d < 0)) && d=0
    echo "$d"
}
# MiB of host memory a row needs: the source holds what the guest wrote, the destination what
# is sent (all of RAM in mode full; with hints only the live data; otherwise what the source
# holds, since never-backed memory is not sent), plus 1 GiB
need_mib() {
    local gib=$1 case=$2 mode=$3 live=256 src dst
    [[ $case == hot ]] && live=$((live + 64))
    src=$live
    [[ $case == idle ]] || src=$((live + $(dirty_mib "$gib")))
    case $mode in full) dst=$((gib * 1024)) ;; hints|ranges) dst=$live ;; *) dst=$src ;; esac
    echo $((src + dst + 1024))
}

# last `guest: verify ok seq=N` in a serial log (0 if none)
last_seq() { awk 'match($0, /guest: verify ok seq=[0-9]+/) { n = substr($0, RSTART + 21, RLENGTH - 21) + 0; if (n > m) m = n } END { print m + 0 }' "$1" 2>/dev/null || echo 0; }
bad_lines() { grep -aE 'guest: (verify FAILED|FAULT|PANIC|FATAL)' "$1" 2>/dev/null || true; }

# Rss of the whole process, and of its largest mapping (the guest RAM), in bytes
rss_bytes() { awk '/^Rss:/ {printf "%.0f\n", $2 * 1024; exit}' "/proc/$1/smaps_rollup" 2>/dev/null || echo null; }
guest_rss_bytes() {
    awk -v want="$2" '
        /^[0-9a-f]+-[0-9a-f]+ / { inmap = 0 }
        /^Size:/ { inmap = ($2 * 1024 >= want) }
        /^Rss:/ && inmap { printf "%.0f\n", $2 * 1024; found = 1; exit }
        END { if (!found) print "null" }' "/proc/$1/smaps" 2>/dev/null || echo null
}

# wait_exit PID SECONDS: sets $exit_code to the exit code of PID (a child of this shell), or
# "running" (not in a $(...): a subshell cannot wait for this shell's children)
exit_code=""
wait_exit() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$1" 2>/dev/null; then exit_code=running; return 0; fi
    exit_code=0
    wait "$1" 2>/dev/null || exit_code=$?
}

# run_one SIZE CASE TRANSPORT MODE RUN: one migration; adds one row to $out
run_one() {
    local gib=$1 case=$2 transport=$3 mode=$4 run=$5
    local mib=$((gib * 1024)) dirty hot=0 ghint=$hint label=$4 balloon=(--balloon size=0,free_page_hinting=on)
    dirty=$(dirty_mib "$gib")
    local d="$work/${case}-${gib}g-${transport}-${mode}-r${run}"
    mkdir -p "$d"
    if ((dirty < 0)); then dirty=0; fi
    local cmdline="used=256"
    case $case in
        ended) cmdline+=" dirty=$dirty" ;;
        hot) cmdline+=" dirty=$dirty hot=64"; hot=64 ;;
    esac
    local opts=""
    case $mode in
        full) opts=",zero_pages=off,free_page_hints=off" ;;
        zero) opts=",free_page_hints=off" ;;
        hints) if [[ $hint == ranges ]]; then label=ranges; fi ;;
        ranges) ghint=ranges ;;
        noballoon) balloon=() ;;
    esac
    cmdline+=" hint=$ghint${BENCH_GUEST_EXTRA:+ $BENCH_GUEST_EXTRA}"
    local meta=("$d" "$gib" "$case" "$transport" "$label" "$run" "$cmdline" "$ghint" "$hot")

    local need_mib avail
    need_mib=$(need_mib "$gib" "$case" "$mode")
    avail=$(avail_mib)
    if ((avail < need_mib)); then
        say "skipped $case ${gib}G $transport $label run $run: needs ~${need_mib} MiB, ${avail} MiB available"
        return
    fi

    # the source
    "$ch" --api-socket "$d/src.sock" --kernel "$guest_elf" --memory "size=${gib}G" --cpus "boot=$cpus" \
        --cmdline "$cmdline" "${balloon[@]}" --serial "file=$d/serial.log" \
        </dev/null >"$d/src.out" 2>&1 &
    src_pid=$!
    local ready_s=$((60 + 20 * gib)) i
    for ((i = 0; i < ready_s * 10; i++)); do
        grep -aq "guest: verify ok" "$d/serial.log" 2>/dev/null && break
        kill -0 "$src_pid" 2>/dev/null || break
        bad_lines "$d/serial.log" | grep -q . && break
        sleep 0.1
    done
    if ! grep -aq "guest: ready" "$d/serial.log" 2>/dev/null || ! grep -aq "guest: verify ok" "$d/serial.log"; then
        say "source not ready ($case ${gib}G $label): $(tail -n3 "$d/serial.log" "$d/src.out" 2>/dev/null | tr '\n' ' ')"
        stop_pair
        local integ=unknown
        if bad_lines "$d/serial.log" | grep -q .; then integ=FAILED; fi
        write_row "${meta[@]}" '{"status":"not-ready"}' 0 0 0 null null null null null null "$integ" || true
        return
    fi

    # the destination, listening
    "$ch" --api-socket "$d/dst.sock" </dev/null >"$d/dst.out" 2>&1 &
    dst_pid=$!
    for ((i = 0; i < 100; i++)); do [[ -S $d/dst.sock ]] && break; sleep 0.05; done
    local url port=""
    if [[ $transport == unix ]]; then url="unix:$d/mig.sock"; else port=$(free_port); url="tcp:127.0.0.1:$port"; fi
    "$remote" --api-socket "$d/dst.sock" receive-migration "$url" </dev/null >"$d/receive.out" 2>"$d/receive.err" &
    rcv_pid=$!
    for ((i = 0; i < 200; i++)); do
        if [[ $transport == unix ]]; then [[ -S $d/mig.sock ]] && break; else tcp_listening "$port" && break; fi
        kill -0 "$rcv_pid" 2>/dev/null || break
        sleep 0.05
    done

    local limit=${BENCH_MIGRATE_TIMEOUT_S:-$((120 + 30 * gib))} st rc=0 seq_before
    seq_before=$(last_seq "$d/serial.log")
    # in the background, so that Ctrl-C (the trap) does not wait for the migration to end
    timeout "$limit" "$remote" --api-socket "$d/src.sock" send-migration "destination_url=$url$opts" \
        </dev/null >"$d/send.out" 2>"$d/send.err" &
    send_pid=$!
    wait "$send_pid" || rc=$?
    send_pid=""
    st=$(cat "$d/send.out")
    # Lines written up to now may already be the destination's: counting them as the source's
    # only makes the check stricter.
    local src_seq rss=null grss=null
    src_seq=$(last_seq "$d/serial.log")
    if [[ $rc == 0 ]]; then
        rss=$(rss_bytes "$dst_pid")
        grss=$(guest_rss_bytes "$dst_pid" $((mib * 1024 * 1024)))
    fi
    echo "$st" >"$d/report.json"
    local status
    status=$(python3 -c 'import json,sys
try: print(json.loads(sys.argv[1]).get("status","?"))
except ValueError: print("error")' "$st")
    if [[ $rc != 0 ]]; then
        if [[ $rc == 124 ]]; then status=timeout; else status=error; fi
        st="{\"status\":\"$status\"}"
    fi

    local dst_seq=0 integrity=unknown rss2=null src_exit=running dst_exit=null
    if [[ $status == completed ]]; then
        local want=$((src_seq + 2)) wait_s=${BENCH_VERIFY_WAIT_S:-10}
        for ((i = 0; i < wait_s * 20; i++)); do
            dst_seq=$(last_seq "$d/serial.log")
            ((dst_seq >= want)) && break
            bad_lines "$d/serial.log" | grep -q . && break
            kill -0 "$dst_pid" 2>/dev/null || break
            sleep 0.05
        done
        dst_seq=$(last_seq "$d/serial.log")
        if bad_lines "$d/serial.log" | grep -q .; then
            integrity=FAILED
        elif ((dst_seq > src_seq)); then
            integrity=ok
        fi
        rss2=$(rss_bytes "$dst_pid")
        wait_exit "$src_pid" 10; src_exit=$exit_code
        [[ $src_exit == running ]] || src_pid=""
        if [[ $src_exit != 0 ]]; then say "odd: the source VMM did not exit 0 after migrating ($src_exit)"; fi
        local rcv_exit
        wait_exit "$rcv_pid" 10; rcv_exit=$exit_code
        [[ $rcv_exit == running ]] || rcv_pid=""
        if [[ $rcv_exit != 0 ]]; then say "odd: receive-migration ended with $rcv_exit: $(head -c 300 "$d/receive.err")"; fi
        "$remote" --api-socket "$d/dst.sock" shutdown >/dev/null 2>"$d/shutdown.err" ||
            say "odd: ch-remote shutdown of the destination failed: $(head -c 300 "$d/shutdown.err")"
        wait_exit "$dst_pid" 10; dst_exit=$exit_code
        [[ $dst_exit == running ]] || dst_pid=""
        if [[ $dst_exit != 0 ]]; then say "odd: the destination VMM did not exit 0 after shutdown ($dst_exit)"; fi
    else
        say "migration $status ($case ${gib}G $transport $label): $(head -c 500 "$d/send.err" | tr '\n' ' ')"
        if bad_lines "$d/serial.log" | grep -q .; then integrity=FAILED; fi
    fi
    if [[ $integrity != ok ]]; then
        say "integrity $integrity ($case ${gib}G $transport $label run $run): seq before switch-over $src_seq, after $dst_seq; log tail:"
        tail -n 5 "$d/serial.log" | sed 's/^/    /' >&2
        keep=1
    fi
    stop_pair
    [[ $src_exit == running ]] && src_exit=null
    [[ $dst_exit == running ]] && dst_exit=null

    # the raw bandwidth of this transport for this row's bytes, with the pair gone
    local raw=null
    if [[ $status == completed ]]; then
        local bytes
        bytes=$(python3 -c 'import json,sys; print(max(int(json.loads(sys.argv[1]).get("bytes_sent") or 0), 64 << 20))' "$st")
        if ((bytes / 1048576 + 1024 < $(avail_mib))); then
            raw=$(timeout 300 "$rawbw" "$transport" "$bytes" fresh4k 2>"$d/raw.err" | tail -n1) || raw=null
            [[ -n $raw ]] || raw=null
        else
            say "raw bandwidth of $bytes bytes skipped: not enough free memory"
        fi
    fi
    write_row "${meta[@]}" "$st" "$seq_before" "$src_seq" "$dst_seq" "$rss" "$grss" "$rss2" "$raw" "$src_exit" "$dst_exit" "$integrity" || say "could not write the row to $out"
}

# write_row DIR GIB CASE TRANSPORT MODE RUN CMDLINE GUEST_HINT HOT_MIB REPORT_JSON SEQ_BEFORE SRC_SEQ
#           DST_SEQ RSS GUEST_RSS RSS_AFTER_VERIFY RAW_JSON SRC_EXIT DST_EXIT INTEGRITY
write_row() {
    python3 - "$out" "$cpus" "${thp:-unknown}" "$commit" "$tree_modified" "$@" <<'PY'
import json, os, sys, time
(out, cpus, thp, commit, modified, d, gib, case, transport, mode, run, cmdline, ghint, hot, st,
 seq_before, src_seq, dst_seq, rss, grss, rss2, raw, src_exit, dst_exit, integ) = sys.argv[1:]
st = json.loads(st)
hints = st.get("hints") or {}
num = lambda v: None if v in ("null", "", None) else int(float(v))
try:
    raw = json.loads(raw) if raw not in ("null", "") else {}
except ValueError:
    raw = {}
row = {
    "vmm": "ours", "case": case, "mem_gib": int(gib), "transport": transport, "mode": mode,
    "run": int(run),
    "total_ms": st.get("total_ms"), "downtime_ms": st.get("downtime_ms"),
    "bytes_sent": st.get("bytes_sent"), "wire_bytes": st.get("wire_bytes"),
    "zero_pages_skipped": st.get("zero_pages_skipped"),
    "hint_wait_ms": hints.get("wait_ms"), "pages_hinted": hints.get("pages_hinted"),
    "pages_skipped": hints.get("pages_skipped"), "rounds": st.get("rounds"),
    "dest_rss_bytes": num(rss), "raw_bw_bytes_per_s": raw.get("bytes_per_s"),
    "integrity": integ,
    "status": st.get("status"), "memory_bytes": st.get("memory_bytes"), "pages_sent": st.get("pages_sent"),
    "hints_used": hints.get("used"), "hints_mode": hints.get("mode"), "hint_cmd_id": hints.get("cmd_id"),
    "hints_rejected": hints.get("rejected"), "hints_reason": hints.get("reason"),
    "pages_unpopulated": st.get("pages_unpopulated"), "phases": st.get("phases"),
    "used_mib": 256, "hot_mib": int(hot),
    "dest_guest_rss_bytes": num(grss), "dest_rss_after_verify_bytes": num(rss2),
    "seq_before": int(seq_before), "src_last_seq": int(src_seq), "dst_seq": int(dst_seq),
    "src_exited": num(src_exit), "dst_exit": num(dst_exit),
    "raw_bw_bytes": raw.get("bytes"), "raw_bw_seconds": raw.get("seconds"),
    "cpus": int(cpus), "cmdline": cmdline, "guest_hint": ghint, "host_thp": thp,
    "commit": commit, "tree_modified": modified == "true",
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
}
if st.get("downtime_breakdown") is not None:
    row["downtime_breakdown"] = st["downtime_breakdown"]
rows = []
if os.path.exists(out) and os.path.getsize(out) > 0:
    with open(out) as f:
        text = f.read()
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else data.get("rows", [data])
    except ValueError:  # JSON lines
        rows = [json.loads(l) for l in text.splitlines() if l.strip()]
rows.append(row)
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(rows, f, indent=1)
    f.write("\n")
os.replace(tmp, out)
mib = lambda b: "-" if b is None else "%.0f" % (b / 2**20)
ms = lambda v: "-" if v is None else "%.1f" % v
print("bench-migration: %-5s %dG %-4s %-6s run %s: %s total %s ms, downtime %s ms, sent %s MiB, "
      "hint wait %s ms, dest RSS %s MiB, raw %s MiB/s, integrity %s"
      % (case, int(gib), transport, mode, run, row["status"], ms(row["total_ms"]), ms(row["downtime_ms"]),
         mib(row["bytes_sent"]), ms(row["hint_wait_ms"]), mib(row["dest_rss_bytes"]),
         mib(row["raw_bw_bytes_per_s"]), integ), file=sys.stderr)
if mode in ("hints", "ranges") and row["status"] == "completed" and not row["hints_used"]:
    print("bench-migration: odd: a %s row ran without hints (hints.used false)" % mode, file=sys.stderr)
PY
}

if [[ $append == 0 ]]; then rm -f "$out"; fi
say "guest $guest, VMM $commit$([[ $tree_modified == true ]] && echo ' (tree modified)'), rows -> $out"
for gib in "${size_list[@]}"; do
    for case in "${case_list[@]}"; do
        for transport in "${transport_list[@]}"; do
            # runs outside modes: the modes of one run see the same machine load
            for ((run = 1; run <= runs; run++)); do
                for mode in "${mode_list[@]}"; do
                    run_one "$gib" "$case" "$transport" "$mode" "$run"
                done
            done
        done
    done
done

[[ -s $out ]] || die "no rows were measured"
if [[ $table == 1 ]]; then
    python3 "$root/scripts/bench_report.py" table "$out" || true
    echo
    python3 "$root/scripts/bench_report.py" ratios "$out" || true
    if [[ $sweep == 1 || ${#size_list[@]} -gt 1 ]]; then
        echo
        python3 "$root/scripts/bench_report.py" sizes - "$out" || true
    fi
fi

# The chart: never fails the benchmark.
if [[ $chart == 1 && -n $png ]]; then
    py=${BENCH_PYTHON:-python3}
    if ! "$py" -c 'import matplotlib' 2>/dev/null; then
        venv=$root/target/bench-venv
        if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
            py=$venv/bin/python
        else
            say "matplotlib is missing: installing it into $venv (pip install matplotlib)"
            if { [[ -x $venv/bin/python ]] || python3 -m venv "$venv"; } >/dev/null 2>&1 &&
                timeout 600 "$venv/bin/pip" install --quiet matplotlib >"$work/pip.log" 2>&1; then
                py=$venv/bin/python
            else
                say "could not install matplotlib ($(tail -n1 "$work/pip.log" 2>/dev/null)); no chart." \
                    "Install it with: python3 -m venv $venv && $venv/bin/pip install matplotlib"
            fi
        fi
    fi
    "$py" "$root/scripts/bench_report.py" chart "$png" "$out" || say "the chart failed (the rows are in $out)"
    if [[ $sweep == 1 || ${#size_list[@]} -gt 1 ]]; then
        "$py" "$root/scripts/bench_report.py" sizes "${png%.png}-sizes.png" "$out" ||
            say "the sizes chart failed (the rows are in $out)"
    fi
fi
