#!/usr/bin/env bash
# Proxmox requests, wall time and task waits per build against the fake Proxmox (scripts/demo.sh
# in its BENCH mode): the cloud image and a template source (the Packer-comparable build:
# Packer's proxmox-clone does ~25 requests on the same fake) with instant tasks, then both at
# PVE-like task durations in real time. Measures and prints; asserts nothing.
#   BENCH_N=5 BENCH_PVE_N=2 BENCH_PVE_SCALE=1 scripts/bench-build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
n="${BENCH_N:-5}"
pve_n="${BENCH_PVE_N:-2}"
pve_scale="${BENCH_PVE_SCALE:-1}"
BENCH="$n" TIME_SCALE=0 SOURCE=cloud scripts/demo.sh
BENCH="$n" TIME_SCALE=0 SOURCE=template scripts/demo.sh
BENCH="$pve_n" TIME_SCALE="$pve_scale" TASK_SECS=pve SOURCE=cloud scripts/demo.sh
BENCH="$pve_n" TIME_SCALE="$pve_scale" TASK_SECS=pve SOURCE=template scripts/demo.sh
