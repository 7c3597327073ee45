#!/usr/bin/env bash
# Builds tests/linux-workload (the workload a real Linux guest's /init runs) as a static release
# binary for x86_64-unknown-linux-gnu (glibc linked statically with +crt-static; the musl target is
# not installed on these machines). Build output goes to stderr; the LAST line of stdout is the
# absolute path of the binary.
#
# Environment: CARGO (default: cargo). The target dir is tests/linux-workload/target unless
# CARGO_TARGET_DIR is set.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
project="$root/tests/linux-workload"
cargo=${CARGO:-cargo}
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$project/target}
case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac

command -v "$cargo" >/dev/null 2>&1 || { echo "build-linux-workload: cargo not found" >&2; exit 1; }

# --target keeps RUSTFLAGS away from build scripts; RUSTFLAGS replaces any host flags on purpose.
(
    cd "$project"
    export RUSTFLAGS="-C target-feature=+crt-static"
    unset CARGO_ENCODED_RUSTFLAGS
    "$cargo" build --release --locked --target "$target" --target-dir "$target_dir" 1>&2 ||
        "$cargo" build --release --target "$target" --target-dir "$target_dir" 1>&2
)

bin="$target_dir/$target/release/linux-workload"
[[ -f "$bin" ]] || { echo "build-linux-workload: $bin missing after build" >&2; exit 1; }
# It runs in an initramfs with no shared libraries: it must be statically linked.
if command -v file >/dev/null 2>&1; then
    case "$(file -b "$bin")" in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) echo "build-linux-workload: $bin is not statically linked: $(file -b "$bin")" >&2; exit 1 ;;
    esac
fi
echo "$(cd "$(dirname "$bin")" && pwd -P)/$(basename "$bin")"
