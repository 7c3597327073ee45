#!/usr/bin/env bash
# Local QEMU live migration of the test guest with the virtio-balloon (free page hinting):
# boots a source VM, optionally inflates the balloon, migrates to a destination VM on the same
# host, and shows both serial logs and QEMU's migration statistics.
#   qemu-migrate-test.sh <elf> "<cmdline>" <mem> [balloon_MiB]
# The cmdline must contain pci_ecam=0xe0000000 (microvm pcie=on ECAM) for the balloon.
set -euo pipefail
elf=$1 cmdline=$2 mem=$3 balloon=${4:-}
d=$(mktemp -d /tmp/guestmig.XXXXXX)
common=(-enable-kvm -cpu host,-arch-capabilities -M microvm,pcie=on -m "$mem" -smp 2 -nographic
        -no-reboot -device isa-debug-exit -object iothread,id=io1
        -device virtio-balloon-pci,free-page-hint=on,iothread=io1,disable-legacy=on
        -kernel "$elf" -append "$cmdline")
qemu-system-x86_64 "${common[@]}" -monitor unix:$d/src.mon,server,nowait -serial file:$d/src.log \
    -display none </dev/null >$d/src.out 2>&1 &
src=$!
cleanup() { kill $src ${dst:-} 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
hmp() { python3 "$(dirname "$0")/hmp.py" "$@"; }
for _ in $(seq 600); do grep -q "guest: ready" $d/src.log 2>/dev/null && break; sleep 0.1; done
grep -q "guest: ready" $d/src.log || { echo "source never became ready"; cat $d/src.log; exit 1; }
sleep 1.2
if [[ -n "$balloon" ]]; then
    hmp $d/src.mon "balloon $balloon" >/dev/null
    sleep 2
    hmp $d/src.mon "info balloon"
fi
qemu-system-x86_64 "${common[@]}" -monitor unix:$d/dst.mon,server,nowait -serial file:$d/dst.log \
    -display none -incoming unix:$d/mig.sock </dev/null >$d/dst.out 2>&1 &
dst=$!
sleep 1
hmp $d/src.mon "migrate_set_parameter max-bandwidth 100G" >/dev/null
hmp $d/src.mon "migrate -d unix:$d/mig.sock" >/dev/null
for _ in $(seq 600); do
    st=$(hmp $d/src.mon "info migrate" 0.3 | grep -E "^Migration status" || true)
    [[ "$st" == *completed* || "$st" == *failed* ]] && break
    sleep 0.2
done
hmp $d/src.mon "info migrate" | grep -E "status|total time|downtime|transferred|remaining|duplicate|normal:|setup"
sleep 3
echo "--- source serial (tail)"; grep -v memmap $d/src.log | tail -8
echo "--- destination serial"; cat $d/dst.log
hmp $d/dst.mon "info balloon" || true
echo "logs in $d"
