#!/bin/sh
# /init of the Linux guest (L2) in the nested lab (scripts/linux-lab.sh). Mounts the basics,
# loads the balloon driver named by lab_balloon= on the kernel command line (stock, ranges: the
# driver built with guest-linux-patch/, none), then runs the workload program, or the user's
# --guest-init script, with its output on the serial console.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
arg() { # the value of key $1 on the kernel command line, or $2
    for w in $(cat /proc/cmdline); do
        case "$w" in "$1="*) echo "${w#*=}"; return ;; esac
    done
    echo "$2"
}
case "$(arg lab_balloon stock)" in
stock) insmod /lib/modules/virtio_balloon.ko ;;
ranges) insmod /lib/modules/virtio_balloon_ranges.ko ;;
esac
# What the lab checks: CPUs, and for each virtio device its driver, negotiated feature bits
# (a string of 0/1, bit 0 first) and MSI-X vectors.
echo "lab-guest: cpus=$(grep -c ^processor /proc/cpuinfo) balloon=$(arg lab_balloon stock)"
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/device" ] || continue
    n=${d##*/}
    echo "lab-guest: virtio $n device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver")")" \
        "features=$(cat "$d/features") msix=$(grep -c "PCI-MSIX.*$n-" /proc/interrupts)"
done
if [ "$(arg lab_init workload)" = custom ]; then
    echo "lab-guest: guest-init start"
    sh /guest-init.sh
    echo "lab-guest: guest-init exited with status $?"
else
    /bin/linux-workload
    echo "lab-guest: workload exited with status $?"
fi
# Keep the guest alive (the lab decides when it ends).
while :; do sleep 3600; done
