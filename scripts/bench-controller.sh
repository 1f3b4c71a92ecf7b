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
cargo build --quiet --locked --bin sombrero --example bench_controller
for n in $sizes; do
  echo "== $n GoldenImages"
  target/debug/examples/bench_controller "$n" "$window"
done
