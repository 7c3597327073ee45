#!/bin/sh
# /init of the lab machine (L1) that scripts/linux-lab.sh boots under QEMU's software emulation.
# It loads kvm_amd (nested SVM), then runs the scenarios named by lab_scenarios= on its kernel
# command line: each boots a real Linux guest (L2) under our VMM (or QEMU), checks it, prints
# `lab: <name> ok ...` or `lab: <name> FAILED <why>` and one `LAB-RESULT <json>` line for
# results.json, then the machine powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /tmp && mount -t tmpfs -o size=90% tmp /tmp
. /lab/lib.sh
. /lab/scenarios.sh
. /lab/qemu.sh

for m in irqbypass kvm kvm-amd; do insmod "/lab/modules/$m.ko" || echo "lab: insmod $m failed"; done
if [ ! -e /dev/kvm ]; then
    echo "lab: setup FAILED no /dev/kvm in the lab machine (kvm_amd did not load)"
    echo "LAB-END"
    poweroff -f
fi
RUNS=$(arg lab_runs 3)
echo "lab-l1: kvm ready, $(grep -c ^processor /proc/cpuinfo) cpus, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"
for s in $(arg lab_scenarios "" | tr , ' '); do
    # NAME.N is run N of scenario NAME (linux-lab.sh --runs).
    if command -v "scenario_$(echo "${s%%.*}" | tr - _)" >/dev/null; then
        run_scenario "$s"
    else
        result "$s" false "unknown scenario"
    fi
done
echo "LAB-END"
sync
poweroff -f
