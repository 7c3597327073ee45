# QEMU as the VMM inside the lab machine (sourced by l1-init.sh): the anchor, with the same
# guest, workload and checks as our VMM's migration scenarios.

QEMU=/lab/bin/qemu-system-x86_64

# qemu_start NAME [QEMU args]: a 1 GiB guest with virtio-balloon-pci and free page hinting (QEMU
# refuses free-page-hint without an iothread); the serial console appends to the shared file.
qemu_start() {
    name=$1; shift
    "$QEMU" -L /usr/share/qemu -enable-kvm -cpu host -M microvm,pcie=on -m 1G -smp 1 -nodefaults -no-user-config \
        -display none -chardev "file,id=ser,path=$W/serial.log,append=on" -serial chardev:ser \
        -kernel "$KERNEL_BZ" -initrd "$INITRD" -append "$GUEST_BASE $WORKLOAD" \
        -object iothread,id=io1 -device virtio-balloon-pci,free-page-hint=on,iothread=io1,disable-legacy=on \
        -monitor "unix:$W/$name.mon,server,nowait" "$@" 2>>"$W/$name.err" &
    echo $! >"$W/$name.pid"
    wait_socket "$W/$name.mon" 30 "$name: QEMU did not open its monitor"
}

hmp() { echo "$2" | /lab/bin/socat -t 5 - "UNIX-CONNECT:$W/$1.mon"; }

# A number from `info migrate`: hmp_value FILE "total time" -> 1234
hmp_value() { sed -n "s/^$2: \([0-9]*\).*/\1/p" "$1" | head -n 1; }

scenario_qemu_stock() {
    t_boot=$(now_ms)
    qemu_start qa || return 1
    wait_for "$W/serial.log" "^guest: verify ok" 300 || { fail "no 'guest: verify ok' under QEMU within 300 s"; return 1; }
    BOOT_MS=$(( $(now_ms) - t_boot ))
    check_balloon_bound stock any-irq || return 1
    sleep 2
    qemu_start qb -incoming "unix:$W/q.mig" || return 1
    wait_socket "$W/q.mig" 30 "the QEMU destination did not listen" || return 1
    USED_MIB=$(guest_used_mib)
    before=$(last_seq)
    hmp qa "migrate_set_parameter max-bandwidth 100G" >/dev/null
    hmp qa "migrate -d unix:$W/q.mig" >/dev/null
    n=0
    while :; do
        hmp qa "info migrate" >"$W/info"
        grep -q "^Migration status: completed" "$W/info" && break
        grep -q "^Migration status: \(failed\|cancelled\)" "$W/info" && { fail "QEMU migration: $(grep status "$W/info")"; return 1; }
        sleep 0.5; n=$((n + 1))
        if [ $n -ge 600 ]; then
            echo "lab-l1: --- info migrate"; cat "$W/info"
            fail "QEMU migration did not complete in 300 s"
            return 1
        fi
    done
    total=$(hmp_value "$W/info" "total time")
    downtime=$(hmp_value "$W/info" "downtime")
    kib=$(hmp_value "$W/info" "transferred ram")
    DEST_RSS_MIB=$(awk '/^Rss:/ {printf "%d\n", $2 / 1024}' "/proc/$(pid_of qb)/smaps_rollup")
    check_integrity "$before"
    DETAIL="total $total ms, sent $((kib / 1024)) MiB (used $USED_MIB MiB), downtime $downtime ms, dest RSS $DEST_RSS_MIB MiB"
    EXTRA=",\"vmm\":\"qemu\",\"total_ms\":$total,\"bytes_sent\":$((kib * 1024)),\"downtime_ms\":$downtime"
    EXTRA="$EXTRA,\"dest_rss_mib\":$DEST_RSS_MIB,\"used_mib\":${USED_MIB:-null},\"integrity\":\"$INTEGRITY\""
    EXTRA="$EXTRA,\"hints\":{\"mode\":\"stock\",\"used\":null}"
    [ "$INTEGRITY" = ok ] || { fail "the guest did not verify its memory after QEMU's migration"; return 1; }
}
