#!/usr/bin/env bash
# What the container image test (tests/integration/chart.rs) needs besides scripts/image.sh: Debian's runc
# (runs the image; crun 1.8 refuses this machine's hybrid cgroup v1/v2 layout) and umoci
# (unpacks the OCI layout into a runtime bundle, as a registry client and kubelet would),
# and the CA bundle the image carries. Installed with apt-get when missing (needs root).
set -euo pipefail
need=()
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
if [[ ${#need[@]} -eq 0 ]]; then
    echo "image-tools: runc, umoci and ca-certificates present" >&2
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "image-tools: error: missing ${need[*]}; install with: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
echo "image-tools: installing ${need[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
}
