#!/usr/bin/env bash
# Builds the freestanding test guest (tests/guest) in release mode for the host target
# (x86_64-unknown-linux-gnu, linked freestanding by tests/guest/build.rs + linker.ld).
# Build output goes to stderr; the LAST line of stdout is the absolute path of the guest ELF.
#
# Environment: CARGO (default: cargo). The guest's own target dir is tests/guest/target unless
# CARGO_TARGET_DIR is set.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
guest="$root/tests/guest"
cargo=${CARGO:-cargo}
target_dir=${CARGO_TARGET_DIR:-$guest/target}
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac

command -v "$cargo" >/dev/null 2>&1 || { echo "build-test-guest: cargo not found" >&2; exit 1; }
command -v cc >/dev/null 2>&1 || { echo "build-test-guest: a C compiler driver 'cc' is needed as linker" >&2; exit 1; }

# The host target is used, so no `rustup target add` is needed. Host RUSTFLAGS would leak
# into the freestanding link (e.g. -C target-cpu, linker options): keep them out.
(
    cd "$guest"
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
        "$cargo" build --release --locked --bin test-guest --target-dir "$target_dir" 1>&2 ||
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS \
        "$cargo" build --release --bin test-guest --target-dir "$target_dir" 1>&2
)

elf="$target_dir/release/test-guest"
[[ -f "$elf" ]] || { echo "build-test-guest: $elf missing after build" >&2; exit 1; }
# sanity: must carry the PVH note (XEN_ELFNOTE_PHYS32_ENTRY)
if command -v readelf >/dev/null 2>&1 && ! readelf -n "$elf" 2>/dev/null | grep -q "Xen"; then
    echo "build-test-guest: $elf has no Xen PVH note" >&2
    exit 1
fi
echo "$(cd "$(dirname "$elf")" && pwd -P)/$(basename "$elf")"
