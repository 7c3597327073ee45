#!/usr/bin/env bash
# Boots the test guest under QEMU microvm (KVM) for a few seconds and prints each serial line
# prefixed with the milliseconds since QEMU was started.
#   qemu-run.sh <elf> <seconds> "<cmdline>" [extra qemu args...]
# Example: qemu-run.sh target/release/test-guest 8 "used=64 dirty=256 hot=8" -m 4G -smp 2
set -euo pipefail
elf=$1 secs=$2 cmdline=$3
shift 3
start=$(date +%s%N)
timeout "$secs" qemu-system-x86_64 -enable-kvm -cpu host,-arch-capabilities -M microvm \
    -nographic -no-reboot -device isa-debug-exit -kernel "$elf" -append "$cmdline" "$@" 2>&1 |
while IFS= read -r line; do
    now=$(date +%s%N)
    printf '%6d ms  %s\n' $(( (now - start) / 1000000 )) "${line%$'\r'}"
done || true
