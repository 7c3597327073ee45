#!/usr/bin/env bash
# Runs every test: the workspace's unit tests, the end-to-end tests under tests/ (which build and
# boot the test guest under KVM), and the test guest's own host-side unit tests.
# Needs /dev/kvm: without it this fails at once rather than skipping anything.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [[ ! -e /dev/kvm ]]; then
    echo "run-tests: /dev/kvm is missing: these tests need KVM" >&2
    exit 1
fi
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "run-tests: /dev/kvm is not readable and writable by $(id -un)" >&2
    exit 1
fi

echo "== test guest: host unit tests (tests/guest/guest-core)"
(cd tests/guest && cargo test -p guest-core --quiet)

echo "== Linux guest workload: host unit tests (tests/linux-workload)"
(cd tests/linux-workload && cargo test --locked --quiet)

echo "== fuzz targets and seed maker: still build against the crates (scripts/fuzz.sh runs them)"
(cd fuzz && cargo check --all-targets --quiet)

echo "== workspace: unit and end-to-end tests"
# End-to-end tests boot real guests; two at a time is what a 2-core machine takes.
cargo test --workspace --quiet -- --test-threads=2
