#!/usr/bin/env bash
# Steady-state cost of the controller: Proxmox requests per resync and per reconcile round,
# reconcile latency (the controller's histogram) and RSS, with 100 and 1,000 GoldenImages whose
# latest templates already exist. Rerunnable; prints, asserts nothing about time.
#   BENCH_SIZES="100 1000" BENCH_WINDOW=65 scripts/bench-controller.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-tools.sh >/dev/null
scripts/fakepve-venv.sh >/dev/null

sizes="${BENCH_SIZES:-100 1000}"
window="${BENCH_WINDOW:-65}"
target="${CARGO_TARGET_DIR:-target}"
cargo build --quiet --locked --bin sombrero --example bench_controller
# The controller binary is named explicitly: a target directory shared with another checkout
# may hold an example built there, whose compiled-in repository path is not this one.
export SOMBRERO_BIN="$PWD/$target/debug/sombrero"
case "$target" in /*) SOMBRERO_BIN="$target/debug/sombrero" ;; esac
for n in $sizes; do
  echo "== $n GoldenImages"
  "$target/debug/examples/bench_controller" "$n" "$window"
done
