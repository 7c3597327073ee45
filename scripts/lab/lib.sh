# Helpers for the lab machine's scenarios (sourced by l1-init.sh; busybox sh).
# Layout inside the lab machine: /lab/bin (our VMM, ch-remote, QEMU), /lab/guest (the guest's
# vmlinuz, vmlinux and initramfs), /lab/modules (kvm), /tmp/<scenario> (work files).

CH=/lab/bin/cloud-hypervisor
CR=/lab/bin/ch-remote
KERNEL_BZ=/lab/guest/vmlinuz
KERNEL_PVH=/lab/guest/vmlinux
INITRD=/lab/guest/initrd.gz
# The guest workload of the issue's targets: 1 GiB guest, 128 MiB live, 640 MiB just freed.
WORKLOAD="used=128 dirty=640"
GUEST_BASE="console=ttyS0 panic=-1 quiet"

arg() { # the value of key $1 on this machine's kernel command line, or $2
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}

now_ms() { awk '{printf "%d\n", $1 * 1000}' /proc/uptime; }

# result NAME OK WHY [EXTRA_JSON_FIELDS]: the two lines the lab's driver collects.
result() {
    if [ "$2" = true ]; then
        echo "lab: $1 ok $3"
    else
        echo "lab: $1 FAILED $3"
    fi
    why=$(echo "$3" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')
    echo "LAB-RESULT {\"name\":\"$1\",\"ok\":$2,\"detail\":\"$why\"$4}"
}

fail() { # a failed check inside a scenario: print why and return 1 from run_step
    echo "lab-l1: $*"
    FAILURE="$*"
    return 1
}

# run_scenario NAME[.N]: runs scenario_NAME in /tmp/NAME[.N] (every wait in it is bounded), then
# kills what it left running.
run_scenario() {
    W=/tmp/$1
    export W
    rm -rf "$W"; mkdir -p "$W"
    FAILURE=""
    DETAIL=""
    EXTRA=""
    echo "lab-l1: scenario $1 starts"
    t0=$(now_ms)
    if "scenario_$(echo "${1%%.*}" | tr - _)"; then
        result "$1" true "$DETAIL ($(( ($(now_ms) - t0) / 1000 )) s)" "$EXTRA"
    else
        result "$1" false "${FAILURE:-failed} ($(( ($(now_ms) - t0) / 1000 )) s)" "$EXTRA"
        for f in "$W"/*.err; do
            [ -s "$f" ] && { echo "lab-l1: --- $f"; tail -n 5 "$f"; }
        done
        [ -f "$W/serial.log" ] && { echo "lab-l1: --- guest serial (last lines)"; tail -n 15 "$W/serial.log"; }
    fi
    stop_all
}

stop_all() {
    for p in "$W"/*.pid; do
        [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null
    done
    sleep 0.5
    rm -f "$W"/*.pid
}

wait_for() { # wait_for FILE REGEX SECONDS
    n=0
    while [ $n -lt $(($3 * 5)) ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.2
        n=$((n + 1))
    done
    return 1
}

# start_vmm NAME [cloud-hypervisor flags]: our VMM with its API on $W/NAME.sock, its log (info
# level: rounds, the destination's VM build and restore steps) in $W/NAME.err.
start_vmm() {
    name=$1; shift
    "$CH" -vv --api-socket "$W/$name.sock" "$@" 2>>"$W/$name.err" &
    echo $! >"$W/$name.pid"
    wait_socket "$W/$name.sock" 20 "$name: the VMM did not open its API socket"
}

wait_socket() { # wait_socket PATH SECONDS WHY: until PATH is a socket, or fail with WHY
    n=0
    until [ -S "$1" ]; do
        sleep 0.1; n=$((n + 1))
        [ $n -lt $(($2 * 10)) ] || { fail "$3"; return 1; }
    done
}

remote() { name=$1; shift; "$CR" --api-socket "$W/$name.sock" "$@"; }

pid_of() { cat "$W/$1.pid"; }

# boot_guest NAME KERNEL MEMORY CPUS "CMDLINE" BALLOON: a guest under our VMM, up to its first
# verified pass. BALLOON is a --balloon value or "none".
boot_guest() {
    set -- "$@"
    t_boot=$(now_ms)
    if [ "$6" = none ]; then
        start_vmm "$1" --kernel "$2" --initramfs "$INITRD" --memory "size=$3" --cpus "boot=$4" \
            --cmdline "$GUEST_BASE $5" --serial "file=$W/serial.log" || return 1
    else
        start_vmm "$1" --kernel "$2" --initramfs "$INITRD" --memory "size=$3" --cpus "boot=$4" \
            --cmdline "$GUEST_BASE $5" --balloon "$6" --serial "file=$W/serial.log" || return 1
    fi
    wait_for "$W/serial.log" "^guest: verify ok" 300 || { fail "$1: no 'guest: verify ok' within 300 s"; return 1; }
    BOOT_MS=$(( $(now_ms) - t_boot ))
    echo "lab-l1: $1 booted in $BOOT_MS ms: $(grep -m1 '^guest: ready' "$W/serial.log")"
}

# check_integrity SEQ: INTEGRITY=ok once the guest verified its memory three more times after
# SEQ (within 60 s: a guest that stalls after the move fails too) and never printed a failure,
# INTEGRITY=failed otherwise.
check_integrity() {
    INTEGRITY=failed
    n=0
    while [ $n -lt 300 ]; do
        s=$(last_seq)
        [ -n "$s" ] && [ "$s" -gt $((${1:-0} + 2)) ] && { INTEGRITY=ok; break; }
        sleep 0.2; n=$((n + 1))
    done
    grep -q "verify FAILED" "$W/serial.log" && INTEGRITY=failed
}

last_seq() { grep -o '^guest: verify ok seq=[0-9]*' "$W/serial.log" | tail -n 1 | cut -d= -f2; }

# guest_used_mib: MemTotal - MemFree from the workload's last meminfo line.
guest_used_mib() {
    grep '^guest: meminfo' "$W/serial.log" | tail -n 1 |
        sed 's/.*total_kib=\([0-9]*\) free_kib=\([0-9]*\).*/\1 \2/' | awk '{printf "%d\n", ($1 - $2) / 1024}'
}

# guest_free_kib: MemFree from the workload's last meminfo line.
guest_free_kib() {
    grep '^guest: meminfo' "$W/serial.log" | tail -n 1 | sed 's/.*free_kib=\([0-9]*\).*/\1/'
}


json_field() { # json_field FILE KEY: the first number after "KEY": in a one-line JSON file
    sed -n "s/.*\"$2\": *\([0-9.eE+-]*\).*/\1/p" "$1" | head -n 1
}

json_string() { sed -n "s/.*\"$2\": *\"\([^\"]*\)\".*/\1/p" "$1" | head -n 1; }

# migrate SRC DST "OPTIONS": live-migrates SRC to a new VMM DST over a UNIX socket, checks the
# guest verifies its memory on DST, and sets REPORT (the report file), DEST_RSS_MIB, USED_MIB
# and MIGRATION_JSON (fields for results.json).
migrate() {
    start_vmm "$2" || return 1
    remote "$2" receive-migration "unix:$W/$2.mig" >"$W/$2.recv" 2>&1 &
    receiver=$!
    wait_socket "$W/$2.mig" 10 "$2: the receiver did not listen" || return 1
    USED_MIB=$(guest_used_mib)
    before=$(last_seq)
    REPORT=$W/report-$2.json
    if ! remote "$1" send-migration "destination_url=unix:$W/$2.mig$3" >"$REPORT" 2>"$W/send-$2.err"; then
        fail "send-migration $1 -> $2: $(cat "$W/send-$2.err")"
        return 1
    fi
    wait "$receiver"
    DEST_RSS_MIB=$(awk '/^Rss:/ {printf "%d\n", $2 / 1024}' "/proc/$(pid_of "$2")/smaps_rollup")
    check_integrity "$before"
    MIGRATION_JSON=",\"total_ms\":$(json_field "$REPORT" total_ms),\"bytes_sent\":$(json_field "$REPORT" bytes_sent)"
    MIGRATION_JSON="$MIGRATION_JSON,\"downtime_ms\":$(json_field "$REPORT" downtime_ms),\"dest_rss_mib\":$DEST_RSS_MIB"
    MIGRATION_JSON="$MIGRATION_JSON,\"used_mib\":${USED_MIB:-null},\"integrity\":\"$INTEGRITY\""
    MIGRATION_JSON="$MIGRATION_JSON,\"hints\":$(sed 's/.*"hints":\({[^}]*}\).*/\1/' "$REPORT"),\"report\":$(cat "$REPORT")"
    echo "lab-l1: $1 -> $2: $(cat "$REPORT")"
    grep -h "restored\|state of" "$W/$2.err" | sed "s/^/lab-l1: $2: /"
    [ "$INTEGRITY" = ok ] || { fail "$1 -> $2: the guest did not verify its memory after the migration"; return 1; }
}

# A one-line summary of the last migration for the lab: line.
migration_summary() {
    mib=$(( $(json_field "$REPORT" bytes_sent | cut -d. -f1) / 1048576 ))
    echo "total $(json_field "$REPORT" total_ms | cut -d. -f1) ms, sent $mib MiB${USED_MIB:+ (used $USED_MIB MiB)}," \
        "downtime $(json_field "$REPORT" downtime_ms | cut -d. -f1) ms, hints $(json_string "$REPORT" mode)" \
        "$(json_field "$REPORT" pages_hinted) pages, dest RSS $DEST_RSS_MIB MiB"
}
