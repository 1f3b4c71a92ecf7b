#!/usr/bin/env bash
# Cost of the controller: cold start to all Ready, Proxmox requests per resync and per reconcile
# round, no-op reconcile latency (the controller's histogram), RSS, and how long a template
# deleted in Proxmox takes to show in its image's status; with N GoldenImages whose latest
# templates already exist, and optionally other VMs in the cluster (a consumer's 10,000 VMs).
# Rerunnable; prints, asserts nothing about time.
#   BENCH_RUNS="100:0 1000:0 1000:9000" BENCH_WINDOW=65 scripts/bench-controller.sh
#   (each run: GoldenImages:other VMs; BENCH_SIZES="100 1000" is the same as "100:0 1000:0";
#   BENCH_CONCURRENCY=n runs the controller with --concurrency n; BENCH_PROFILE=debug measures a
#   debug build instead of the release build a pod runs, whose code alone maps tens of MiB more)
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${BENCH_PROFILE:-release}"
case "$profile" in
  release | debug) ;;
  *) echo "bench-controller: BENCH_PROFILE is release (the default) or debug, not '$profile'" >&2; exit 2 ;;
esac
scripts/test-tools.sh >/dev/null
scripts/fakepve-venv.sh >/dev/null

runs="${BENCH_RUNS:-}"
if [ -z "$runs" ]; then
  if [ -n "${BENCH_SIZES:-}" ]; then
    for n in $BENCH_SIZES; do runs="$runs $n:0"; done
  else
    runs="100:0 1000:0 1000:9000"
  fi
fi
window="${BENCH_WINDOW:-65}"
target="${CARGO_TARGET_DIR:-target}"
if [ "$profile" = release ]; then
  cargo build --quiet --locked --release --bin sombrero
else
  cargo build --quiet --locked --bin sombrero
fi
cargo build --quiet --locked --example bench_controller
# The controller binary is named explicitly: a target directory shared with another checkout
# may hold an example built there, whose compiled-in repository path is not this one.
# SOMBRERO_BIN=path measures another binary (e.g. a copy of main's).
if [ -z "${SOMBRERO_BIN:-}" ]; then
  case "$target" in
    /*) SOMBRERO_BIN="$target/$profile/sombrero" ;;
    *) SOMBRERO_BIN="$PWD/$target/$profile/sombrero" ;;
  esac
fi
echo "bench-controller: measuring $SOMBRERO_BIN"
export SOMBRERO_BIN
for run in $runs; do
  n="${run%%:*}" others="${run#*:}"
  echo "== $n GoldenImages, $others other VMs"
  "$target/debug/examples/bench_controller" "$n" "$window" "$others"
done
