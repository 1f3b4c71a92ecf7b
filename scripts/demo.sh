#!/usr/bin/env bash
# The demo: a fake Proxmox VE (tests/fakepve/harness.py, with its guest model) on loopback, and
# `sombrero build -f` of examples/ubuntu-24.04-minimal.yaml against it, end to end.
#
#   scripts/demo.sh                      one build, prints the seed's JSON
#   BENCH=N TIME_SCALE=S scripts/demo.sh N builds, then Proxmox requests per build and wall time
#
# The harness only downloads loopback URLs, so the example is copied with the fake's image URL,
# checksum, node, a loopback build IP and the fake's SSH port; everything else is the example.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH="${BENCH:-0}"
TIME_SCALE="${TIME_SCALE:-0}"

scripts/fakepve-venv.sh >/dev/null
PY=.venv/fakepve/bin/python
cargo build --quiet --bin sombrero
BIN=target/debug/sombrero

work="$(mktemp -d)"
fifo="$work/stdin"
mkfifo "$fifo"
host="127.$((RANDOM % 200 + 20)).$((RANDOM % 250 + 1)).1"
# The harness exits when its stdin closes: keep a writer open for our lifetime.
exec 7<>"$fifo"
"$PY" tests/fakepve/harness.py --host "$host" --dir "$work" --time-scale "$TIME_SCALE" \
  <"$fifo" >"$work/handoff" 2>"$work/harness.log" &
harness=$!
cleanup() { kill "$harness" 2>/dev/null || true; exec 7>&-; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 1 300); do [ -s "$work/handoff" ] && break; sleep 0.1; done
[ -s "$work/handoff" ] || { echo "the fake Proxmox did not start:" >&2; cat "$work/harness.log" >&2; exit 1; }

field() { "$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())[sys.argv[2]])' "$work/handoff" "$1"; }
control="$(field control_url)"
image="$(curl -sf -X POST "$control/images" -H 'content-type: application/json' \
  -d '{"filename": "noble-server-cloudimg-amd64.img"}')"
ssh_port="$(field ssh_port)"
guest_ip="127.$(echo "$host" | cut -d. -f2).$(( $(echo "$host" | cut -d. -f3) ^ 128 )).10"

url="$(echo "$image" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["url"])')"
sha="$(echo "$image" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["checksums"]["sha256"])')"
# Only these lines of the example change (it is our own file: line edits are enough).
sed -e "s|^\( *url:\).*|\1 $url|" \
    -e "s|^\( *\)checksumUrl:.*|\1checksum: sha256:$sha|" \
    -e "s|^\( *\)ipConfig:.*|\1ipConfig: ip=$guest_ip/8\n\1port: $ssh_port|" \
    -e "s|^\( *node:\).*|\1 pve1|" \
    examples/ubuntu-24.04-minimal.yaml >"$work/image.yaml"

export PROXMOX_URL="$(field url)" PROXMOX_TOKEN_ID="$(field token_id)" PROXMOX_CA_CERT="$(field ca_cert_path)"
PROXMOX_TOKEN_SECRET="$(field token_secret)"
export PROXMOX_TOKEN_SECRET

if [ "$BENCH" -eq 0 ]; then
  echo "fake Proxmox VE at $PROXMOX_URL; building from examples/ubuntu-24.04-minimal.yaml" >&2
  "$BIN" build -f "$work/image.yaml"
  exit 0
fi

start=$(date +%s.%N)
for i in $(seq 1 "$BENCH"); do
  "$BIN" build -f "$work/image.yaml" >/dev/null 2>>"$work/bench.log"
done
end=$(date +%s.%N)
requests="$(curl -sf "$control/requests?since=0" | "$PY" -c 'import json,sys; print(len(json.load(sys.stdin)))')"
"$PY" -c 'import sys; n,r,s,e,ts=int(sys.argv[1]),int(sys.argv[2]),float(sys.argv[3]),float(sys.argv[4]),sys.argv[5]; print("time scale %s: %d builds, %.1f Proxmox requests per build, %.2f s wall per build" % (ts, n, r/n, (e-s)/n))' \
  "$BENCH" "$requests" "$start" "$end" "$TIME_SCALE"
