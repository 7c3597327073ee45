#!/usr/bin/env bash
# Compile-check the guest Linux patch from scratch.
#
#   guest-linux-patch/check.sh            # tree in /tmp/linux-src/check
#   LINUX_SRC_DIR=/somewhere check.sh     # anywhere outside the repository
#
# 1. installs Debian's linux-source-6.12 and the build tools if missing;
# 2. extracts a fresh tree, runs checkpatch.pl on the patch;
# 3. x86_64 defconfig + CONFIG_VIRTIO/VIRTIO_PCI/VIRTIO_BALLOON=m,
#    modules_prepare, builds the unpatched driver (the baseline);
# 4. applies the patch (no rejects allowed) and builds the patched driver
#    with W=1 -Werror (and sparse, if installed);
# 5. checks that every symbol the patch newly needs from the kernel is
#    exported, since the driver is built as a module;
# 6. again with CONFIG_MEMORY_HOTPLUG/MEMORY_HOTREMOVE/PAGE_POISONING, which
#    turn the stubs the patch relies on into real code.
# Exits non-zero at the first failure.  Only the one driver is compiled
# (make -j2): no vmlinux, so nothing is booted.
set -euo pipefail

KVER_PKG=linux-source-6.12
TARBALL=/usr/src/${KVER_PKG}.tar.xz
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH="$HERE/0001-virtio_balloon-hint-free-page-ranges.patch"
WORK=${LINUX_SRC_DIR:-/tmp/linux-src/check}
OBJ=drivers/virtio/virtio_balloon.o
JOBS=${JOBS:-2}

step() { printf '\n=== %s\n' "$*"; }
fail() { printf 'check.sh: FAILED: %s\n' "$*" >&2; exit 1; }

case "$WORK/" in
"$(cd "$HERE/.." && pwd)"/*) fail "LINUX_SRC_DIR must be outside the repository" ;;
esac
[ -f "$PATCH" ] || fail "missing $PATCH"

step "packages"
need=()
[ -f "$TARBALL" ] || need+=("$KVER_PKG")
for tool in gcc make flex bison bc perl python3 xz; do
	command -v "$tool" >/dev/null || need+=("$tool")
done
[ -f /usr/include/libelf.h ] || need+=(libelf-dev)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
	# Debian package names of the tools that are not named after them.
	pkgs=()
	for p in "${need[@]}"; do
		case "$p" in
		gcc) pkgs+=(gcc libc6-dev) ;;
		xz) pkgs+=(xz-utils) ;;
		*) pkgs+=("$p") ;;
		esac
	done
	echo "installing: ${pkgs[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
[ -f "$TARBALL" ] || fail "$TARBALL not found after installing $KVER_PKG"

step "extract $TARBALL into $WORK"
rm -rf "$WORK"
mkdir -p "$WORK"
tar -xJf "$TARBALL" -C "$WORK"
SRC="$WORK/$KVER_PKG"
cd "$SRC"
echo "kernel $(make -s kernelversion)"

step "checkpatch"
./scripts/checkpatch.pl --strict "$PATCH" || fail "checkpatch"

configure() {
	make -s defconfig
	./scripts/config -e VIRTIO_MENU -e VIRTIO -e VIRTIO_PCI -m VIRTIO_BALLOON "$@"
	make -s olddefconfig
	local opt
	for opt in VIRTIO=y VIRTIO_PCI=y VIRTIO_BALLOON=m; do
		grep -q "^CONFIG_$opt\$" .config || fail "CONFIG_$opt did not stick"
	done
	make -j"$JOBS" modules_prepare
}

build() {
	rm -f "$OBJ"
	make -j"$JOBS" "$@" "$OBJ"
	[ -f "$OBJ" ] || fail "$OBJ was not built"
}

undefined_syms() { nm -u "$OBJ" | awk '{ print $2 }' | sort -u; }

step "config 1: defconfig + virtio balloon (module)"
configure

step "baseline: unpatched driver"
build
undefined_syms >"$WORK/stock.syms"

step "apply patch"
patch -p1 --dry-run <"$PATCH" >"$WORK/patch.log" || { cat "$WORK/patch.log"; fail "patch does not apply"; }
patch -p1 <"$PATCH" | tee "$WORK/patch.log"
if grep -qi 'fuzz\|offset' "$WORK/patch.log"; then
	echo "note: the patch applied with offsets or fuzz (a newer $KVER_PKG?)"
fi

exports() {
	# Every symbol that modules may use; the export macros name it once.
	[ -f "$WORK/exports" ] ||
		grep -rhoE --include='*.c' --include='*.S' --include='*.h' \
			'EXPORT_(SYMBOL|SYMBOL_GPL|PER_CPU_SYMBOL|PER_CPU_SYMBOL_GPL|STATIC_CALL|STATIC_CALL_GPL|STATIC_CALL_TRAMP|STATIC_CALL_TRAMP_GPL)\([A-Za-z0-9_]+\)' \
			kernel mm lib drivers/base drivers/virtio arch/x86 include |
		sed -E 's/.*\(([A-Za-z0-9_]+)\)/\1/' | sort -u >"$WORK/exports"
}

check_exports() {
	exports
	local sym missing=0
	undefined_syms >"$WORK/patched.syms"
	echo "symbols the patch newly needs:"
	for sym in $(comm -13 "$WORK/stock.syms" "$WORK/patched.syms"); do
		# Static calls are imported through their trampoline.
		if grep -qx "$sym" "$WORK/exports" ||
			grep -qx "${sym#__SCT__}" "$WORK/exports"; then
			echo "  $sym: exported"
		else
			echo "  $sym: NOT EXPORTED"
			missing=1
		fi
	done
	[ "$missing" = 0 ] || fail "the module would not load: unexported symbols"
}

step "patched driver, config 1 (W=1, -Werror)"
build W=1 KCFLAGS=-Werror
check_exports
if command -v sparse >/dev/null; then
	step "sparse"
	build C=1 2>&1 | tee "$WORK/sparse.log"
	if grep -q 'virtio_balloon.*\(warning\|error\)' "$WORK/sparse.log"; then
		fail "sparse"
	fi
fi

step "config 2: + memory hot(un)plug and page poisoning"
configure -e MEMORY_HOTPLUG -e MEMORY_HOTREMOVE -e PAGE_POISONING
for opt in MEMORY_HOTPLUG MEMORY_HOTREMOVE PAGE_POISONING; do
	grep -q "^CONFIG_$opt=y\$" .config || fail "CONFIG_$opt did not stick"
done
build W=1 KCFLAGS=-Werror
check_exports

step "result"
echo "kernel: $(make -s kernelversion) ($KVER_PKG $(dpkg-query -W -f='${Version}' "$KVER_PKG" 2>/dev/null || echo '?'))"
echo "patch: $(basename "$PATCH") applies, checkpatch clean, $OBJ compiles in both configs"
echo "check.sh: OK"
