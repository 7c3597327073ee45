#!/usr/bin/env bash
# The reference benchmark: the same migration workloads as scripts/bench-migration.sh, run on
# Debian's QEMU (microvm, KVM) with its virtio-balloon free page hinting on and off.
#
# For each size x case x transport x mode x run it boots the test guest (tests/guest) in a source
# QEMU, waits for `guest: ready`, starts a destination QEMU with -incoming, lifts QEMU's migration
# bandwidth cap, migrates over a local UNIX socket or TCP on 127.0.0.1, and records QMP's
# query-migrate figures, the destination's RSS, and whether the destination's serial log shows a
# `guest: verify ok` with a seq above the source's last one and no FAILED line.
#
# Usage: scripts/bench-qemu.sh [options]
#   --sizes 1,2,4          guest RAM sizes in GiB (default 1,2,4; 8 allowed)
#   --cases idle,ended,hot workloads (default all three):
#                            idle:  used=256                              migrated right after ready
#                            ended: used=256 dirty=<RAM-768MiB>           most of RAM written, then freed
#                            hot:   used=256 dirty=<RAM-768MiB> hot=64    plus 64 MiB rewritten throughout
#   --transports unix,tcp  (default unix)      --transport is an alias
#   --modes qemu-hints,qemu-nohints            (default both; nohints = balloon with free-page-hint=off)
#   --runs N               repetitions of every row (default 1)
#   --quick                1 GiB, unix, ended only
#   --out FILE             JSON file the rows are appended to (default ./bench-qemu.json)
#   --guest ELF            test guest ELF (default: built by scripts/build-test-guest.sh)
#   --cpus N               guest vCPUs (default 2; the hot loop runs on the second one)
#   --qemu BIN             (default qemu-system-x86_64)
#   --keep-logs            keep the per-run directories (serial logs, QEMU output) under $TMPDIR
#   --no-table             do not print the table at the end
# Environment: BENCH_MIGRATE_TIMEOUT_S (default 120 + 30 per GiB), BENCH_VERIFY_WAIT_S (default 10),
# BENCH_GUEST_EXTRA (appended to the guest command line, e.g. "selftest=corrupt" to see a FAILED row).
#
# Each row (one JSON object in the array of --out):
#   {"vmm":"qemu","case":..,"mem_gib":..,"transport":..,"mode":..,"run":..,"total_ms":..,
#    "downtime_ms":..,"bytes_sent":..,"dest_rss_bytes":..,"integrity":"ok"|"FAILED"|"unknown", ...}
# bytes_sent is QMP's ram.transferred (all RAM bytes put on the stream, page headers included);
# dest_rss_bytes is Rss from /proc/<dest pid>/smaps_rollup (the whole QEMU process) once the
# destination has verified; dest_guest_rss_bytes is the Rss of the guest RAM mapping alone.
# Extra fields: status, setup_ms, rounds, normal_bytes, zero_pages, mbps, src_last_seq,
# dst_seq, cpus, cmdline, qemu, host_thp, date. QEMU's downtime limit stays at its default (300 ms).
# Times vary a lot from run to run on a shared 2-core machine (seen: 0.2-1.2 GB/s for the same
# row; the spinning guest, QEMU's migration thread and the destination's first touch of fresh
# memory share two cores): use --runs 3 or more and read the medians.
# Only one QEMU pair runs at a time; both are always killed (also on Ctrl-C).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sizes=1,2,4 cases=idle,ended,hot transports=unix modes=qemu-hints,qemu-nohints runs=1
out=bench-qemu.json guest="" cpus=2 qemu=qemu-system-x86_64 keep=0 table=1

die() { echo "bench-qemu: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --sizes) sizes=${2:?}; shift ;;
        --cases) cases=${2:?}; shift ;;
        --transports|--transport) transports=${2:?}; shift ;;
        --modes) modes=${2:?}; shift ;;
        --runs) runs=${2:?}; shift ;;
        --quick) sizes=1 transports=unix cases=ended ;;
        --out) out=${2:?}; shift ;;
        --guest) guest=${2:?}; shift ;;
        --cpus) cpus=${2:?}; shift ;;
        --qemu) qemu=${2:?}; shift ;;
        --keep-logs) keep=1 ;;
        --no-table) table=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs wants a positive number"
[[ $cpus =~ ^[1-9][0-9]*$ ]] || die "--cpus wants a positive number"
IFS=, read -ra size_list <<<"$sizes"
IFS=, read -ra case_list <<<"$cases"
IFS=, read -ra transport_list <<<"$transports"
IFS=, read -ra mode_list <<<"$modes"
for s in "${size_list[@]}"; do [[ $s =~ ^[1-9][0-9]*$ ]] || die "bad size '$s' (GiB, e.g. --sizes 1,2,4)"; done
for c in "${case_list[@]}"; do [[ $c =~ ^(idle|ended|hot)$ ]] || die "bad case '$c' (idle, ended, hot)"; done
for t in "${transport_list[@]}"; do [[ $t =~ ^(unix|tcp)$ ]] || die "bad transport '$t' (unix, tcp)"; done
for m in "${mode_list[@]}"; do [[ $m =~ ^qemu-(hints|nohints)$ ]] || die "bad mode '$m' (qemu-hints, qemu-nohints)"; done
command -v "$qemu" >/dev/null || die "$qemu not found (apt-get install qemu-system-x86)"
[[ -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is not usable"
command -v python3 >/dev/null || die "python3 is needed"
case $out in /*) ;; *) out="$PWD/$out" ;; esac

if [[ -z $guest ]]; then
    guest=$("$root/scripts/build-test-guest.sh" | tail -n1) || die "building the test guest failed"
fi
[[ -f $guest ]] || die "guest ELF $guest not found"
qemu_version=$("$qemu" --version | head -n1 | sed 's/^QEMU emulator version //')
thp=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || true)

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-qemu.XXXXXX")
src_pid="" dst_pid=""
stop_pair() {
    local p
    for p in $src_pid $dst_pid; do kill "$p" 2>/dev/null || true; done
    for p in $src_pid $dst_pid; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    src_pid="" dst_pid=""
}
cleanup() {
    stop_pair
    if [[ $keep == 1 ]]; then echo "bench-qemu: logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A small QMP client: `qmp.py SOCK wait` (until the monitor answers), `qmp.py SOCK cmd NAME [JSON]`
# (prints the return value), `qmp.py SOCK migrate URI TIMEOUT_S` (lifts the bandwidth cap,
# migrates, polls query-migrate every 50 ms; prints the final query-migrate as JSON).
cat >"$work/qmp.py" <<'PY'
import json, socket, sys, time

class Qmp:
    def __init__(self, path, timeout=5.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""
        self.read()  # greeting
        self.cmd("qmp_capabilities")

    def read(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("QMP closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError("%s: %s" % (name, r["error"].get("desc", r["error"])))
            # events are skipped

path, what = sys.argv[1], sys.argv[2]
if what == "wait":
    end = time.time() + float(sys.argv[3] if len(sys.argv) > 3 else 30)
    while True:
        try:
            print(json.dumps(Qmp(path, 2.0).cmd("query-status")))
            break
        except (OSError, EOFError, ValueError):
            if time.time() > end:
                sys.exit("QMP at %s did not answer" % path)
            time.sleep(0.05)
elif what == "cmd":
    args = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(Qmp(path).cmd(sys.argv[3], args)))
elif what == "migrate":
    uri, limit = sys.argv[3], float(sys.argv[4])
    q = Qmp(path, 120.0)  # QMP does not answer while the VM is stopped for the switch-over
    # 1 TiB/s: effectively no cap (QEMU's default is 32 MiB/s)
    q.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    q.cmd("migrate", {"uri": uri})
    end = time.time() + limit
    while True:
        st = q.cmd("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.time() > end:
            q.cmd("migrate_cancel")
            st = q.cmd("query-migrate")
            st["status"] = "timeout"
            break
        time.sleep(0.05)
    print(json.dumps(st))
PY
qmp() { python3 "$work/qmp.py" "$@"; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# last `guest: verify ok seq=N` in a serial log (0 if none)
last_seq() { awk 'match($0, /guest: verify ok seq=[0-9]+/) { n = substr($0, RSTART + 21, RLENGTH - 21) + 0; if (n > m) m = n } END { print m + 0 }' "$1" 2>/dev/null || echo 0; }
bad_lines() { grep -aE 'guest: (verify FAILED|FAULT|PANIC|FATAL)' "$1" 2>/dev/null || true; }

# Rss of the whole process, and of its largest mapping (the guest RAM), in bytes
rss_bytes() { awk '/^Rss:/ {print $2 * 1024; exit}' "/proc/$1/smaps_rollup" 2>/dev/null || echo null; }
guest_rss_bytes() {
    awk -v want="$2" '
        /^[0-9a-f]+-[0-9a-f]+ / { inmap = 0 }
        /^Size:/ { inmap = ($2 * 1024 >= want) }
        /^Rss:/ && inmap { print $2 * 1024; found = 1; exit }
        END { if (!found) print "null" }' "/proc/$1/smaps" 2>/dev/null || echo null
}

# run_one SIZE CASE TRANSPORT MODE RUN: one migration; appends one row to $out
run_one() {
    local gib=$1 case=$2 transport=$3 mode=$4 run=$5
    local mib=$((gib * 1024)) dirty=$((gib * 1024 - 768)) hint=on
    local d="$work/${case}-${gib}g-${transport}-${mode}-r${run}"
    mkdir -p "$d"
    if [[ $mode == qemu-nohints ]]; then hint=off; fi
    if ((dirty < 0)); then dirty=0; fi
    local cmdline="used=256"
    case $case in
        ended) cmdline+=" dirty=$dirty" ;;
        hot) cmdline+=" dirty=$dirty hot=64" ;;
    esac
    cmdline+=" pci_ecam=0xe0000000${BENCH_GUEST_EXTRA:+ $BENCH_GUEST_EXTRA}"
    local common=(-enable-kvm -cpu host,-arch-capabilities -M microvm,pcie=on -m "${mib}M" -smp "$cpus"
        -nodefaults -no-user-config -no-reboot -device isa-debug-exit
        -object iothread,id=io1
        -device "virtio-balloon-pci,free-page-hint=$hint,iothread=io1,disable-legacy=on"
        -kernel "$guest" -append "$cmdline")
    # ended/hot: source and destination each end up holding most of the guest's RAM
    local need_mib=$((2 * mib + 1024)) avail_mib
    if [[ $case == idle ]]; then need_mib=2048; fi
    avail_mib=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
    if ((avail_mib < need_mib)); then
        echo "bench-qemu: skipped $case ${gib}G $transport $mode run $run: needs ~${need_mib} MiB, ${avail_mib} MiB available" >&2
        return
    fi
    local uri
    if [[ $transport == unix ]]; then uri="unix:$d/mig.sock"; else uri="tcp:127.0.0.1:$(free_port)"; fi

    "$qemu" "${common[@]}" -qmp "unix:$d/src.qmp,server=on,wait=off" -serial "file:$d/src.log" \
        -display none </dev/null >"$d/src.out" 2>&1 &
    src_pid=$!
    local ready_s=$((60 + 20 * gib)) i
    for ((i = 0; i < ready_s * 10; i++)); do
        grep -aq "guest: ready" "$d/src.log" 2>/dev/null && break
        kill -0 "$src_pid" 2>/dev/null || break
        bad_lines "$d/src.log" | grep -q . && break
        sleep 0.1
    done
    if ! grep -aq "guest: ready" "$d/src.log" 2>/dev/null; then
        echo "bench-qemu: source not ready ($case ${gib}G $mode): $(tail -n3 "$d/src.log" "$d/src.out" 2>/dev/null | tr '\n' ' ')" >&2
        stop_pair
        local integ=unknown
        if bad_lines "$d/src.log" | grep -q .; then integ=FAILED; fi
        write_row "$d" "$gib" "$case" "$transport" "$mode" "$run" "$cmdline" '{"status":"not-ready"}' 0 0 null null "$integ"
        return
    fi
    # the destination, listening
    "$qemu" "${common[@]}" -qmp "unix:$d/dst.qmp,server=on,wait=off" -serial "file:$d/dst.log" \
        -display none -incoming "$uri" </dev/null >"$d/dst.out" 2>&1 &
    dst_pid=$!
    qmp "$d/dst.qmp" wait 30 >/dev/null || { echo "bench-qemu: destination QMP did not answer" >&2; }

    local limit=${BENCH_MIGRATE_TIMEOUT_S:-$((120 + 30 * gib))} st
    st=$(qmp "$d/src.qmp" migrate "$uri" "$limit" 2>"$d/migrate.err") || st='{"status":"error"}'
    echo "$st" >"$d/query-migrate.json"
    local status
    status=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("status","?"))' "$st")

    # integrity: the destination must verify past the source's last seq, and nothing may fail
    local src_seq dst_seq=0 integrity=unknown rss=null grss=null
    src_seq=$(last_seq "$d/src.log")
    if [[ $status == completed ]]; then
        local want=$((src_seq + 2)) wait_s=${BENCH_VERIFY_WAIT_S:-10}
        for ((i = 0; i < wait_s * 20; i++)); do
            dst_seq=$(last_seq "$d/dst.log")
            ((dst_seq >= want)) && break
            bad_lines "$d/dst.log" | grep -q . && break
            kill -0 "$dst_pid" 2>/dev/null || break
            sleep 0.05
        done
        dst_seq=$(last_seq "$d/dst.log")
        if bad_lines "$d/dst.log" | grep -q . || bad_lines "$d/src.log" | grep -q .; then
            integrity=FAILED
        elif ((dst_seq > src_seq)); then
            integrity=ok
        fi
        rss=$(rss_bytes "$dst_pid")
        grss=$(guest_rss_bytes "$dst_pid" $((mib * 1024 * 1024)))
    else
        echo "bench-qemu: migration $status ($case ${gib}G $transport $mode): $(cat "$d/migrate.err")" >&2
        if bad_lines "$d/src.log" | grep -q .; then integrity=FAILED; fi
    fi
    stop_pair
    write_row "$d" "$gib" "$case" "$transport" "$mode" "$run" "$cmdline" "$st" "$src_seq" "$dst_seq" "$rss" "$grss" "$integrity"
}

# write_row DIR GIB CASE TRANSPORT MODE RUN CMDLINE QUERY_MIGRATE_JSON SRC_SEQ DST_SEQ RSS GUEST_RSS INTEGRITY
write_row() {
    python3 - "$out" "$qemu_version" "$cpus" "${thp:-unknown}" "$@" <<'PY'
import json, os, sys, time
out, qver, cpus, thp, d, gib, case, transport, mode, run, cmdline, st, src_seq, dst_seq, rss, grss, integ = sys.argv[1:]
st = json.loads(st)
ram = st.get("ram", {})
num = lambda v: None if v in ("null", "", None) else int(v)
row = {
    "vmm": "qemu", "case": case, "mem_gib": int(gib), "transport": transport, "mode": mode,
    "run": int(run),
    "total_ms": st.get("total-time"), "downtime_ms": st.get("downtime"),
    "bytes_sent": ram.get("transferred"), "dest_rss_bytes": num(rss),
    "integrity": integ,
    "status": st.get("status"), "setup_ms": st.get("setup-time"),
    "rounds": ram.get("dirty-sync-count"), "normal_bytes": ram.get("normal-bytes"),
    "zero_pages": ram.get("duplicate"), "mbps": ram.get("mbps"),
    "dest_guest_rss_bytes": num(grss), "src_last_seq": int(src_seq), "dst_seq": int(dst_seq),
    "cpus": int(cpus), "cmdline": cmdline, "qemu": qver, "host_thp": thp,
    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
}
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
print("bench-qemu: %-5s %dG %-4s %-12s run %s: %s total %s ms, downtime %s ms, sent %s MiB, dest RSS %s MiB, integrity %s"
      % (case, int(gib), transport, mode, run, row["status"], row["total_ms"], row["downtime_ms"],
         mib(row["bytes_sent"]), mib(row["dest_rss_bytes"]), integ), file=sys.stderr)
PY
}

echo "bench-qemu: guest $guest, QEMU $qemu_version, rows -> $out" >&2
for gib in "${size_list[@]}"; do
    for case in "${case_list[@]}"; do
        for transport in "${transport_list[@]}"; do
            for mode in "${mode_list[@]}"; do
                for ((run = 1; run <= runs; run++)); do
                    run_one "$gib" "$case" "$transport" "$mode" "$run"
                done
            done
        done
    done
done

if [[ $table == 1 ]]; then
    python3 "$root/scripts/bench_report.py" table "$out"
fi
