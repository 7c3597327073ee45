# The lab's scenarios (sourced by l1-init.sh after lib.sh). Each scenario_<name> runs in $W,
# returns 0 when every check held, sets DETAIL (a summary) and EXTRA (more results.json fields).

BALLOON="size=0,free_page_hinting=on,statistics=on,free_page_reporting=off"

# The guest's virtio line for the balloon (device id 5), as l2-init.sh prints it.
balloon_line() { grep -m1 '^lab-guest: virtio .* device=0x0005' "$W/serial.log"; }

# Checks that the driver bound the device over virtio-pci with MSI-X (not checked if $2 =
# any-irq: QEMU's microvm gives none) and negotiated FREE_PAGE_HINT (feature bit 3; bit 60 too
# if $1 = ranges).
check_balloon_bound() {
    line=$(balloon_line)
    [ -n "$line" ] || { fail "no virtio balloon device in the guest"; return 1; }
    echo "$line" | grep -q "driver=virtio_balloon" || { fail "virtio_balloon did not bind: $line"; return 1; }
    features=$(echo "$line" | sed 's/.*features=\([01]*\).*/\1/')
    [ "$(echo "$features" | cut -c4)" = 1 ] || { fail "FREE_PAGE_HINT not negotiated: $line"; return 1; }
    if [ "$1" = ranges ]; then
        [ "$(echo "$features" | cut -c61)" = 1 ] || { fail "HINT_RANGES not negotiated: $line"; return 1; }
    fi
    msix=$(echo "$line" | sed 's/.*msix=\([0-9]*\).*/\1/')
    [ "$2" = any-irq ] || [ "${msix:-0}" -ge 2 ] || { fail "the balloon has no MSI-X vectors: $line"; return 1; }
}

boot_check() { # kernel file, label
    boot_guest a "$1" 512M 1 "used=64" "$BALLOON" || return 1
    check_balloon_bound || return 1
    DETAIL="$2 to the workload's first verified pass in $BOOT_MS ms; $(balloon_line | cut -d' ' -f3-)"
    EXTRA=",\"boot_ms\":$BOOT_MS"
}

scenario_boot_pvh() { boot_check "$KERNEL_PVH" "PVH vmlinux"; }

scenario_boot_bzimage() { boot_check "$KERNEL_BZ" bzImage; }

actual_mib() { remote a info | sed -n 's/.*"memory_actual_size": *\([0-9]*\).*/\1/p' | awk '{printf "%d\n", $1 / 1048576}'; }

wait_actual() { # MiB, seconds
    n=0
    while [ $n -lt $(($2 * 2)) ]; do
        [ "$(actual_mib)" = "$1" ] && return 0
        sleep 0.5; n=$((n + 1))
    done
    return 1
}

scenario_balloon() {
    boot_guest a "$KERNEL_BZ" 1G 1 "used=64" "$BALLOON" || return 1
    check_balloon_bound || return 1
    remote a resize --balloon 256M >/dev/null || { fail "resize to 256M refused"; return 1; }
    wait_actual 768 120 || { fail "memory_actual_size stayed at $(actual_mib) MiB, not 768"; return 1; }
    inflated=$(actual_mib)
    rss_in=$(awk '/^Rss:/ {printf "%d\n", $2 / 1024}' "/proc/$(pid_of a)/smaps_rollup")
    remote a resize --balloon 0 >/dev/null || { fail "resize to 0 refused"; return 1; }
    wait_actual 1024 120 || { fail "memory_actual_size stayed at $(actual_mib) MiB after deflating"; return 1; }
    # Statistics arrive when the device asks for them; give the driver a few periods.
    n=0
    until remote a counters | grep -q '"stats": *{[^}]*[0-9]'; do
        sleep 1; n=$((n + 1))
        [ $n -lt 30 ] || { fail "no balloon statistics in vm.counters: $(remote a counters)"; return 1; }
    done
    before=$(last_seq); sleep 3
    [ "$(last_seq)" -gt "$before" ] || { fail "the workload stopped verifying"; return 1; }
    DETAIL="inflated to $inflated MiB (VMM RSS $rss_in MiB) and back to $(actual_mib) MiB; stats: $(remote a counters | grep -o '"stats": *{[^}]*}' | cut -c1-120)"
}

# One migration of the issue's workload: VMM options, send options, cmdline extras, label.
migration_scenario() {
    boot_guest a "$KERNEL_BZ" 1G "$1" "$WORKLOAD $3" "$4" || return 1
    [ "$4" = none ] || check_balloon_bound "$5" || return 1
    sleep 2
    migrate a b "$2" || return 1
    DETAIL=$(migration_summary)
    EXTRA="$MIGRATION_JSON"
}

scenario_migrate_stock() { migration_scenario 1 "" "" "$BALLOON"; }
scenario_migrate_off() { migration_scenario 1 ",free_page_hints=off" "" "$BALLOON"; }
scenario_migrate_noballoon() { migration_scenario 1 "" "" none; }
# The same workload with the patched driver: free lists walked, nothing allocated or zeroed.
scenario_migrate_ranges() { migration_scenario 1 "" "lab_balloon=ranges" "$BALLOON" ranges; }
# Two vCPUs, 16 MiB rewritten continuously during the migration.
scenario_migrate_hot_2cpu() {
    migration_scenario 2 "" "hot=16" "$BALLOON" || return 1
    cpus=$(grep -m1 -o '^lab-guest: cpus=[0-9]*' "$W/serial.log" | cut -d= -f2)
    DETAIL="guest saw $cpus CPUs; $DETAIL"
    [ "$cpus" = 2 ] || { fail "the guest runs on $cpus CPU(s) with --cpus boot=2"; return 1; }
}
# Debian's default init_on_alloc=1 makes the stock driver zero each block it hints.
scenario_init_on_alloc_0() { migration_scenario 1 "" "init_on_alloc=0" "$BALLOON"; }
scenario_init_on_alloc_1() { migration_scenario 1 "" "init_on_alloc=1" "$BALLOON"; }

# Free memory fragmented below 4 MiB: the patched driver's ranges against the stock driver.
fragmented() { # lab_balloon value
    boot_guest a "$KERNEL_BZ" 1G 1 "used=128 fragment=640 lab_balloon=$1" "$BALLOON" || return 1
    check_balloon_bound "$1" || return 1
    sleep 2
    free=$(guest_free_kib)
    migrate a b "" || return 1
    skipped=$(json_field "$REPORT" pages_skipped)
    pct=$(awk -v s="$skipped" -v f="$free" 'BEGIN {printf "%.1f\n", (f > 0 ? 100 * s / (f / 4) : 0)}')
    DETAIL="skipped $pct% of the guest's free pages; $(migration_summary)"
    EXTRA="$MIGRATION_JSON,\"free_pages\":$((free / 4)),\"skipped_pct\":$pct"
}
scenario_ranges_fragmented() { fragmented ranges; }
scenario_stock_fragmented() { fragmented stock; }

# The user's own workload (--guest-init): wait for its first line, migrate with hints on, let it
# run 10 s more on the destination, show everything it printed.
scenario_guest_init() {
    boot_guest_custom || return 1
    wait_for "$W/serial.log" "^lab-guest: guest-init start" 300 || { fail "the guest-init script did not start"; return 1; }
    n=0
    until [ "$(sed -n '/^lab-guest: guest-init start/,$p' "$W/serial.log" | wc -l)" -ge 2 ]; do
        sleep 0.2; n=$((n + 1))
        [ $n -lt 600 ] || { fail "the guest-init script printed nothing in 120 s"; return 1; }
    done
    lines_before=$(wc -l <"$W/serial.log")
    start_vmm b || return 1
    remote b receive-migration "unix:$W/b.mig" >"$W/b.recv" 2>&1 &
    wait_socket "$W/b.mig" 10 "the receiver did not listen" || return 1
    REPORT=$W/report-b.json
    remote a send-migration "destination_url=unix:$W/b.mig" >"$REPORT" 2>"$W/send-b.err" ||
        { fail "send-migration: $(cat "$W/send-b.err")"; return 1; }
    echo "lab-l1: migrated: $(cat "$REPORT")"
    sleep 10
    echo "lab-l1: --- guest-init output before the migration"
    sed -n '/^lab-guest: guest-init start/,$p' "$W/serial.log" | head -n "$((lines_before - $(grep -n '^lab-guest: guest-init start' "$W/serial.log" | cut -d: -f1) + 1))" | sed 's/^/lab-guest-out: /'
    echo "lab-l1: --- guest-init output after the migration"
    tail -n "+$((lines_before + 1))" "$W/serial.log" | sed 's/^/lab-guest-out: /'
    USED_MIB=""; DEST_RSS_MIB=$(awk '/^Rss:/ {printf "%d\n", $2 / 1024}' "/proc/$(pid_of b)/smaps_rollup")
    DETAIL="migrated after the script's first line; $(migration_summary)"
    EXTRA=",\"report\":$(cat "$REPORT")"
}

boot_guest_custom() {
    start_vmm a --kernel "$KERNEL_BZ" --initramfs "$INITRD" --memory size=1G --cpus boot=1 \
        --cmdline "$GUEST_BASE lab_init=custom" --balloon "$BALLOON" --serial "file=$W/serial.log"
}

# DONE after a migration: the guest gets its hinted blocks back on the destination (MemFree
# recovers), and a second hints-on migration from there hints again.
scenario_migrate_twice() {
    boot_guest a "$KERNEL_BZ" 1G 1 "$WORKLOAD" "$BALLOON" || return 1
    check_balloon_bound || return 1
    sleep 2
    free_before=$(guest_free_kib)
    migrate a b "" || return 1
    first=$(json_field "$REPORT" pages_hinted)
    sleep 5
    free_after=$(guest_free_kib)
    [ "$free_after" -gt $((free_before * 3 / 4)) ] ||
        { echo "lab-l1: destination counters: $(remote b counters)"; echo "lab-l1: hints: $(remote b balloon-hints 2>&1)"
          fail "the guest kept its hinted blocks: MemFree $free_before KiB before, $free_after KiB 5 s after"; return 1; }
    migrate b c "" || return 1
    second=$(json_field "$REPORT" pages_hinted)
    [ "${second:-0}" -gt $((first / 2)) ] ||
        { fail "the second migration hinted $second pages, the first $first"; return 1; }
    DETAIL="hinted $first then $second pages; MemFree $free_before KiB before, $free_after KiB after the first; $(migration_summary)"
    EXTRA="$MIGRATION_JSON,\"first_pages_hinted\":$first"
}

# Stock hint rounds outside any migration (no dirty logging), back to back on one guest with
# Debian's default init_on_alloc=1: separates what the driver and our device do in a round from
# what dirty logging adds (Linux guests were lost in stock hint rounds during migrations).
scenario_hint_rounds() {
    boot_guest a "$KERNEL_BZ" 1G 1 "$WORKLOAD" "$BALLOON" || return 1
    check_balloon_bound || return 1
    rounds=0; pages=""
    while [ $rounds -lt "${HINT_ROUNDS:-12}" ]; do
        sleep 2
        out=$(remote a balloon-hints start 2>&1) || { fail "round $((rounds + 1)): $out"; return 1; }
        pages="$pages $(echo "$out" | sed -n 's/.*"pages": *\([0-9]*\).*/\1/p')"
        remote a balloon-hints done >/dev/null 2>&1 || { fail "round $((rounds + 1)): done refused"; return 1; }
        rounds=$((rounds + 1))
        before=$(last_seq)
        n=0
        until [ "$(last_seq)" -gt "${before:-0}" ]; do
            sleep 0.5; n=$((n + 1))
            kill -0 "$(pid_of a)" 2>/dev/null || { fail "the VMM ended after round $rounds: $(tail -n 3 "$W/a.err")"; return 1; }
            [ $n -lt 120 ] || { fail "the guest stopped verifying after round $rounds"; return 1; }
        done
    done
    grep -q "verify FAILED" "$W/serial.log" && { fail "the guest's memory check failed"; return 1; }
    DETAIL="$rounds rounds, pages hinted:$pages"
}

# Hints off, the guest rewriting 600 MiB all the time: a storm of dirty-logging write faults like
# the one the stock driver's zeroing (init_on_alloc=1) makes in a hint round, without any hint.
# The migration need not converge (it is cancelled after 20 s); the guest must survive it.
scenario_write_storm() {
    boot_guest a "$KERNEL_BZ" 1G 1 "used=128 hot=600" "$BALLOON" || return 1
    sleep 2
    start_vmm b || return 1
    remote b receive-migration "unix:$W/b.mig" >"$W/b.recv" 2>&1 &
    wait_socket "$W/b.mig" 10 "b: the receiver did not listen" || return 1
    before=$(last_seq)
    REPORT=$W/report-b.json
    if remote a send-migration "destination_url=unix:$W/b.mig,free_page_hints=off,timeout_s=20" \
        >"$REPORT" 2>"$W/send-b.err"; then
        outcome="converged"; check_integrity "$before"
        [ "$INTEGRITY" = ok ] || { fail "the guest did not verify after the migration"; return 1; }
    else
        outcome="not migrated: $(cat "$W/send-b.err")"
        grep -q "guest ended" "$W/send-b.err" && { fail "guest lost: $outcome"; return 1; }
        check_integrity "$before"
        [ "$INTEGRITY" = ok ] || { fail "the source guest stopped verifying ($outcome)"; return 1; }
    fi
    DETAIL="guest alive; $outcome"
}
