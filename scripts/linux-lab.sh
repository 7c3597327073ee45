#!/usr/bin/env bash
# Real Linux guests under our VMM on a machine without hardware virtualization: QEMU's software
# emulation (TCG) runs a Debian kernel (the lab machine, L1) that has nested SVM, so kvm_amd
# works there, and our VMM inside it boots stock Linux guests (L2) and migrates them.
# See ../shared/notes/nested-lab.md for the facts this rests on.
#
#   scripts/linux-lab.sh [--scenario NAME]... [--out DIR] [--keep] [--runs N] [--guest-init FILE]
#
# From a fresh clone it installs what it needs (Debian packages: qemu-system-x86,
# busybox-static, cpio, zstd, socat, build tools), downloads the Debian 6.12 cloud kernel with
# its headers and source, builds our binaries, the guest workload (tests/linux-workload), the
# balloon driver with guest-linux-patch/ applied, both initramfs images, boots the lab machine
# and runs the scenarios there. One line per scenario, `lab: <name> ok ...` or
# `lab: <name> FAILED <why>`, then a table; DIR/results.json holds every result and DIR/console.log
# the lab machine's whole console. Exit status 0 only if every scenario held.
#
# --keep keeps the built images in target/linux-lab/build and reuses whatever did not change;
# without it they are built afresh in a temporary directory (downloads are always cached in
# target/linux-lab/cache). --guest-init FILE runs FILE (a busybox sh script) in the guest in
# place of the workload, migrates the guest once its first line appeared, and shows every line
# it printed before and after (scenario guest-init; the default when --guest-init is given).
# LAB_KERNEL_VERSION (default 6.12.117+deb12) picks another Debian cloud kernel of the 6.12
# series, for the lab machine and the guest alike (the patched driver is built for it).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

ALL=(boot-pvh boot-bzimage balloon migrate-stock migrate-off migrate-ranges migrate-noballoon migrate-hot-2cpu migrate-twice
    init-on-alloc-0 init-on-alloc-1 stock-fragmented ranges-fragmented qemu-stock)
# Run only when named (diagnoses): stock hint rounds outside a migration; a write-fault storm.
EXTRA=(hint-rounds write-storm)
# Scenarios measured several times (--runs): the side-by-side numbers.
REPEATED=" migrate-stock migrate-off migrate-ranges migrate-twice qemu-stock hint-rounds write-storm "
KVER=${LAB_KERNEL_VERSION:-6.12.117+deb12}
KFLAVOUR=$KVER-cloud-amd64

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
scenarios=() out=$root/target/linux-lab/out keep=0 runs=3 guest_init=""
while (($#)); do
    case $1 in
    --scenario) scenarios+=("${2:?--scenario needs a name}"); shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --keep) keep=1; shift ;;
    --runs) runs=${2:?--runs needs a number}; shift 2 ;;
    --guest-init) guest_init=$(realpath "${2:?--guest-init needs a file}"); shift 2 ;;
    -h | --help) usage ;;
    *) echo "linux-lab: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "linux-lab: --runs wants a positive number" >&2; exit 2; }
if [[ -n $guest_init ]]; then
    [[ -f $guest_init ]] || { echo "linux-lab: --guest-init: no such file" >&2; exit 2; }
    ((${#scenarios[@]})) || scenarios=(guest-init)
fi
((${#scenarios[@]})) || scenarios=("${ALL[@]}")
for s in "${scenarios[@]}"; do
    [[ " ${ALL[*]} ${EXTRA[*]} guest-init " == *" $s "* ]] || { echo "linux-lab: unknown scenario '$s' (known: ${ALL[*]} ${EXTRA[*]} guest-init)" >&2; exit 2; }
    [[ $s != guest-init || -n $guest_init ]] || { echo "linux-lab: scenario guest-init needs --guest-init FILE" >&2; exit 2; }
done
lab=$root/target/linux-lab
cache=$lab/cache
if ((keep)); then
    build=$lab/build
else
    build=$(mktemp -d "${TMPDIR:-/tmp}/linux-lab.XXXXXX")
    trap 'rm -rf "$build"' EXIT
fi
mkdir -p "$cache" "$build" "$out"
log() { echo "linux-lab: $*" >&2; }
t_start=$SECONDS

# ---- 1. packages -------------------------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[[ -x /bin/busybox ]] && file -L /bin/busybox 2>/dev/null | grep -q static || need+=(busybox-static)
for t in cpio:cpio zstd:zstd xz:xz-utils socat:socat gcc:gcc make:make file:file; do
    command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ---- 2. the Debian kernel, headers and source ----------------------------------------------
pkgs=(linux-image-$KFLAVOUR linux-headers-$KFLAVOUR linux-headers-$KVER-common linux-kbuild-$KVER linux-source-6.12)
kroot=$cache/root-$KVER
if [[ ! -f $kroot/.complete ]]; then
    log "downloading ${pkgs[*]}"
    mkdir -p "$cache/debs"
    (cd "$cache/debs" && apt-get download "${pkgs[@]}" 2>/dev/null) ||
        { apt-get update -qq >/dev/null; (cd "$cache/debs" && apt-get download "${pkgs[@]}" >/dev/null); }
    rm -rf "$kroot"; mkdir -p "$kroot"
    for p in "${pkgs[@]}"; do dpkg-deb -x "$cache/debs/${p}_"*.deb "$kroot"; done
    # The headers' Makefile names the common headers by their installed path.
    sed -i "s|^include /usr/src/|include $kroot/usr/src/|" "$kroot/usr/src/linux-headers-$KFLAVOUR/Makefile"
    touch "$kroot/.complete"
fi
vmlinuz=$kroot/boot/vmlinuz-$KFLAVOUR
mods=$kroot/lib/modules/$KFLAVOUR/kernel

# fresh OUTPUT INPUT...: true when OUTPUT exists and was built from exactly these inputs.
fresh() {
    local outp=$1; shift
    local sum; sum=$(cat "$@" | sha256sum | cut -c1-32)
    if [[ -e $outp && -f $outp.inputs && $(cat "$outp.inputs") == "$sum" ]]; then return 0; fi
    echo "$sum" >"$outp.inputs.new"
    return 1
}
built() { mv "$1.inputs.new" "$1.inputs"; }

# ---- 3. our binaries and the guest workload ---------------------------------------------------
log "building the VMM, ch-remote and the guest workload"
cargo build --release --quiet
workload=$(bash scripts/build-linux-workload.sh | tail -n 1)

# ---- 4. the guest kernel as a PVH vmlinux (the bzImage's zstd payload) ----------------------
vmlinux=$build/vmlinux
if ! fresh "$vmlinux" "$vmlinuz"; then
    log "extracting vmlinux from the bzImage"
    off=$(python3 -c 'import sys; print(open(sys.argv[1], "rb").read().find(b"\x28\xb5\x2f\xfd"))' "$vmlinuz")
    tail -c "+$((off + 1))" "$vmlinuz" | zstd -dcq 2>/dev/null >"$vmlinux" || true
    file "$vmlinux" | grep -q ELF || { log "could not extract vmlinux"; exit 1; }
    built "$vmlinux"
fi

# ---- 5. virtio_balloon with guest-linux-patch/ applied, for the guest kernel -----------------
patch=$root/guest-linux-patch/0001-virtio_balloon-hint-free-page-ranges.patch
ranges_ko=$build/virtio_balloon_ranges.ko
if ! fresh "$ranges_ko" "$patch" "$kroot/.complete"; then
    log "building virtio_balloon.ko with the guest patch against $KFLAVOUR"
    m=$build/balloon-module; rm -rf "$m"; mkdir -p "$m/src"
    tar -xJf "$kroot/usr/src/linux-source-6.12.tar.xz" -C "$m/src" --strip-components=1 \
        --wildcards '*/drivers/virtio/virtio_balloon.c' '*/include/uapi/linux/virtio_balloon.h'
    (cd "$m/src" && patch -p1 -s <"$patch")
    mkdir -p "$m/mod/include/linux"
    cp "$m/src/drivers/virtio/virtio_balloon.c" "$m/mod/"
    cp "$m/src/include/uapi/linux/virtio_balloon.h" "$m/mod/include/linux/"
    # The patched uAPI header must win over the kernel's own (<linux/virtio_balloon.h> is found
    # through include/uapi): put it first on the include path.
    printf 'obj-m := virtio_balloon.o\nNOSTDINC_FLAGS += -I$(src)/include\n' >"$m/mod/Kbuild"
    # No BTF for the module (it would need pahole; the driver does not use it).
    make -s -C "$kroot/usr/src/linux-headers-$KFLAVOUR" M="$m/mod" CONFIG_DEBUG_INFO_BTF_MODULES= modules >"$m/build.log" 2>&1 ||
        { cat "$m/build.log" >&2; log "the patched driver did not build"; exit 1; }
    cp "$m/mod/virtio_balloon.ko" "$ranges_ko"
    built "$ranges_ko"
fi

# ---- 6. the guest's initramfs ------------------------------------------------------------------
initrd=$build/initrd.gz
gi=${guest_init:-/dev/null}
if ! fresh "$initrd" scripts/lab/l2-init.sh "$workload" "$ranges_ko" "$gi" "$kroot/.complete"; then
    log "building the guest initramfs"
    d=$build/l2root; rm -rf "$d"; mkdir -p "$d"/{bin,sbin,proc,sys,dev,tmp,lib/modules}
    cp /bin/busybox "$d/bin/"
    for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -sf busybox "$d/bin/$a"; done
    xz -dc "$mods/drivers/virtio/virtio_balloon.ko.xz" >"$d/lib/modules/virtio_balloon.ko"
    cp "$ranges_ko" "$d/lib/modules/virtio_balloon_ranges.ko"
    cp "$workload" "$d/bin/linux-workload"
    install -m 755 scripts/lab/l2-init.sh "$d/init"
    [[ -z $guest_init ]] || cp "$guest_init" "$d/guest-init.sh"
    (cd "$d" && find . | cpio -o -H newc --quiet | gzip -1 >"$initrd")
    built "$initrd"
fi

# ---- 7. the lab machine's initramfs ------------------------------------------------------------
l1=$build/l1.cpio
ch=$root/target/release/cloud-hypervisor
remote=$root/target/release/ch-remote
qemu=$(command -v qemu-system-x86_64)
if ! fresh "$l1" scripts/lab/l1-init.sh scripts/lab/lib.sh scripts/lab/scenarios.sh scripts/lab/qemu.sh \
    "$ch" "$remote" "$initrd" "$vmlinux" "$vmlinuz" "$qemu"; then
    log "building the lab machine's initramfs"
    d=$build/l1root; rm -rf "$d"; mkdir -p "$d"/{bin,sbin,proc,sys,dev,tmp,lab/bin,lab/guest,lab/modules}
    cp /bin/busybox "$d/bin/"
    for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -sf busybox "$d/bin/$a"; done
    for m in virt/lib/irqbypass arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
        xz -dc "$mods/$m.ko.xz" >"$d/lab/modules/${m##*/}.ko"
    done
    cp "$ch" "$remote" "$qemu" "$(command -v socat)" "$d/lab/bin/"
    # Every shared library they load, at the same paths.
    for b in "$ch" "$remote" "$qemu" "$(command -v socat)"; do
        ldd "$b" | grep -o '/[^ ]*' | while read -r lib; do
            mkdir -p "$d$(dirname "$lib")"; cp -L "$lib" "$d$lib"
        done
    done
    mkdir -p "$d/usr/share/qemu"
    for f in bios-microvm.bin bios-256k.bin linuxboot_dma.bin kvmvapic.bin pvh.bin qboot.rom; do
        [[ -e /usr/share/qemu/$f ]] && cp -L "/usr/share/qemu/$f" "$d/usr/share/qemu/"
    done
    cp "$vmlinuz" "$d/lab/guest/vmlinuz"
    cp "$vmlinux" "$d/lab/guest/vmlinux"
    cp "$initrd" "$d/lab/guest/initrd.gz"
    install -m 755 scripts/lab/l1-init.sh "$d/init"
    cp scripts/lab/lib.sh scripts/lab/scenarios.sh scripts/lab/qemu.sh "$d/lab/"
    (cd "$d" && find . | cpio -o -H newc --quiet >"$l1")
    built "$l1"
fi

# ---- 8. run --------------------------------------------------------------------------------------
list=()
for s in "${scenarios[@]}"; do
    if [[ $REPEATED == *" $s "* ]] && ((runs > 1)); then
        for ((i = 1; i <= runs; i++)); do list+=("$s.$i"); done
    else
        list+=("$s")
    fi
done
console=$out/console.log
: >"$console"
t_run=$SECONDS
# run_lab SCENARIO...: one boot of the lab machine; its console is added to $console. Its
# kernel panicking (seen under QEMU's multi-threaded TCG: a stale translation of kernel text
# that was just patched) ends the boot at once instead of at the time limit.
run_lab() {
    local limit=$((600 + 240 * $#)) raw=$build/console.raw qpid line
    log "booting the lab machine for: $*"
    : >"$raw"
    timeout -k 10 "$limit" qemu-system-x86_64 -accel tcg,thread=multi -M q35 \
        -cpu max,-erms,-fsrm,-avx,-avx2 -m 6G -smp 2 -nodefaults -no-user-config -display none \
        -serial stdio -no-reboot -kernel "$vmlinuz" -initrd "$l1" \
        -append "console=ttyS0 panic=-1 quiet lab_runs=$runs lab_scenarios=$(IFS=,; echo "$*")" \
        </dev/null >"$raw" 2>&1 &
    qpid=$!
    while IFS= read -r line; do
        line=${line%$'\r'}
        printf '%s\n' "$line" >>"$console"
        case $line in
        "lab: "* | "lab-l1: "* | "lab-guest-out: "*) printf '%s\n' "$line" ;;
        *"Kernel panic"*) log "the lab machine's kernel panicked: $line"; kill "$qpid" 2>/dev/null || true ;;
        esac
    done < <(tail -n +1 -F --pid="$qpid" "$raw" 2>/dev/null)
    wait "$qpid" || log "the lab machine exited with status $? (124: the ${limit} s limit)"
}
log "built in $((SECONDS - t_start)) s"
run_lab "${list[@]}"
# The emulated lab machine itself can fail (its kernel panics now and then, above): the
# scenarios it did not reach get up to two more, fresh lab machines.
for _ in 1 2; do
    missing=()
    for s in "${list[@]}"; do
        grep -q "^LAB-RESULT {\"name\":\"$s\"" "$console" || missing+=("$s")
    done
    ((${#missing[@]})) || break
    log "the lab machine ended before ${missing[*]} (see $console): again in a fresh one"
    run_lab "${missing[@]}"
done

# ---- 9. results ----------------------------------------------------------------------------------
python3 scripts/lab/results.py "$console" "$out/results.json" "$((SECONDS - t_run))" "${list[@]}"
