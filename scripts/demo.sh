#!/usr/bin/env bash
# The demo: a fake Proxmox VE (tests/fakepve/harness.py, with its guest model) on loopback, and
# `sombrero build -f` of examples/ubuntu-24.04-minimal.yaml against it, end to end.
#
#   scripts/demo.sh                      one build, prints the seed's JSON
#   BENCH=N TIME_SCALE=S scripts/demo.sh N builds of the same image one after another, then per
#                                        build: Proxmox requests (the first build with no template of
#                                        the image yet, the last with N-1), by endpoint, wall time, and
#                                        per task waited for: status polls and how late its end was seen
#   SOURCE=template                      build from a base template (cloned, as Packer's
#                                        proxmox-clone does) instead of the cloud image
#   TASK_SECS=pve                        PVE-like task durations (PVE seconds, scaled by TIME_SCALE):
#                                        download 10, qmcreate 8 (the import), qmclone 10, qmstart 2,
#                                        qmshutdown 6, qmtemplate 2, resize 1, qmdestroy 2
#   BIN=path                             another sombrero binary (e.g. an older build, to compare)
#   KEEP=file                            with BENCH: keep the fake's whole request log (JSON) there
#
# The harness only downloads loopback URLs, so the example is copied with the fake's image URL,
# checksum, node, a loopback build IP and the fake's SSH port; everything else is the example.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH="${BENCH:-0}"
TIME_SCALE="${TIME_SCALE:-0}"
SOURCE="${SOURCE:-cloud}"
TASK_SECS="${TASK_SECS:-0}"

scripts/fakepve-venv.sh >/dev/null
PY=.venv/fakepve/bin/python
if [ -z "${BIN:-}" ]; then
  cargo build --quiet --bin sombrero
  BIN=target/debug/sombrero
fi

work="$(mktemp -d)"
fifo="$work/stdin"
mkfifo "$fifo"
host="127.$((RANDOM % 200 + 20)).$((RANDOM % 250 + 1)).1"
# The harness exits when its stdin closes: keep a writer open for our lifetime.
exec 7<>"$fifo"
"$PY" tests/fakepve/harness.py --host "$host" --dir "$work" --time-scale "$TIME_SCALE" \
  <"$fifo" >"$work/handoff" 2>"$work/harness.log" &
harness=$!
cleanup() {
  kill "$harness" 2>/dev/null || true
  exec 7>&-
  if [ -n "${KEEP:-}" ]; then cp "$work/requests.json" "$KEEP" 2>/dev/null || true; fi
  rm -rf "$work"
}
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
if [ "$SOURCE" = template ]; then
  # A base template with the guest agent (the cloud image's contents); the build clones it.
  curl -sf -X POST "$control/vms" -H 'content-type: application/json' \
    -d '{"vmid": 9000, "name": "base-noble", "template": true, "agent": true, "config": {"agent": "1"}}' >/dev/null
  "$PY" - "$work/image.yaml" <<'PYEOF'
import re, sys
p = sys.argv[1]
s = open(p).read()
s = re.sub(r'    cloudImage:\n      url: .*\n      checksum: .*\n', '    template:\n      name: base-noble\n', s)
open(p, 'w').write(s)
PYEOF
  grep -q 'name: base-noble' "$work/image.yaml" || { echo "could not switch the example to a template source" >&2; exit 1; }
fi
if [ "$TASK_SECS" = pve ]; then
  for t in download:10 qmcreate:8 qmclone:10 qmstart:2 qmshutdown:6 qmtemplate:2 resize:1 qmdestroy:2; do
    curl -sf -X POST "$control/task-secs" -H 'content-type: application/json' \
      -d "{\"type\": \"${t%%:*}\", \"secs\": ${t#*:}}" >/dev/null
  done
fi

export PROXMOX_URL="$(field url)" PROXMOX_TOKEN_ID="$(field token_id)" PROXMOX_CA_CERT="$(field ca_cert_path)"
PROXMOX_TOKEN_SECRET="$(field token_secret)"
export PROXMOX_TOKEN_SECRET

if [ "$BENCH" -eq 0 ]; then
  echo "fake Proxmox VE at $PROXMOX_URL; building from examples/ubuntu-24.04-minimal.yaml" >&2
  "$BIN" build -f "$work/image.yaml"
  exit 0
fi

: >"$work/marks"
for i in $(seq 1 "$BENCH"); do
  seq0="$(curl -sf "$control/requests?since=0" | "$PY" -c 'import json,sys; r=json.load(sys.stdin); print(r[-1]["seq"] if r else 0)')"
  t0=$(date +%s.%N)
  "$BIN" build -f "$work/image.yaml" >/dev/null 2>>"$work/bench.log" || { echo "build $i failed:" >&2; tail -20 "$work/bench.log" >&2; exit 1; }
  echo "$seq0 $t0 $(date +%s.%N)" >>"$work/marks"
done
curl -sf "$control/requests?since=0" >"$work/requests.json"
curl -sf "$control/tasks" >"$work/tasks.json"
"$PY" - "$work" "$SOURCE" "$TIME_SCALE" "$TASK_SECS" <<'PYEOF'
import json, re, statistics, sys
work, source, scale, task_secs = sys.argv[1:5]
reqs = json.load(open(work + '/requests.json'))
tasks = {t['upid']: t for t in json.load(open(work + '/tasks.json'))}
marks = [tuple(map(float, l.split())) for l in open(work + '/marks')]
def endpoint(path):
    path = path.replace('/api2/json', '')
    path = re.sub(r'/qemu/\d+', '/qemu/{vmid}', path)
    path = re.sub(r'/tasks/UPID:[^/]*', '/tasks/{upid}', path)
    return re.sub(r'/storage/[^/]+/', '/storage/{storage}/', path)
per_build = []
for i, (seq0, t0, t1) in enumerate(marks):
    end = marks[i + 1][0] if i + 1 < len(marks) else float('inf')
    per_build.append([r for r in reqs if seq0 < r['seq'] <= end])
counts = [len(b) for b in per_build]
walls = [t1 - t0 for _, t0, t1 in marks]
label = 'source %s, time scale %s%s' % (source, scale, ', PVE-like task durations' if task_secs == 'pve' else '')
print('%s: %d builds, %.1f Proxmox requests per build (first build, no template yet: %d; last, with %d templates of the image: %d), %.2f s wall per build'
      % (label, len(counts), sum(counts) / len(counts), counts[0], len(counts) - 1, counts[-1], sum(walls) / len(walls)))
by = {}
for r in per_build[-1]:
    k = r['method'] + ' ' + endpoint(r['path'])
    by[k] = by.get(k, 0) + 1
print('  last build by endpoint: ' + ', '.join('%s %d' % kv for kv in sorted(by.items(), key=lambda kv: -kv[1])))
polls, late = {}, {}
for r in reqs:
    m = re.search(r'/tasks/(UPID:[^/]*)/status$', r['path'])
    if m and r['method'] == 'GET':
        polls.setdefault(m.group(1), []).append(r['time'])
for upid, times in polls.items():
    t = tasks.get(upid)
    if t and t.get('ended_at'):
        # The wait ends with the first poll that saw the task stopped: the last one.
        late[upid] = max(0.0, times[-1] - t['ended_at'])
if late:
    ls = sorted(late.values())
    n = [len(polls[u]) for u in late]
    # Steady poll rate of tasks polled for more than 2 s: intervals per second between the polls
    # after their first second (the first poll comes right after the task started).
    rates = []
    for u in late:
        ts = polls[u]
        later = [t for t in ts if t >= ts[0] + 1.0]
        if len(later) >= 2 and later[-1] - later[0] >= 1.0:
            rates.append((len(later) - 1) / (later[-1] - later[0]))
    print('  task waits: %d tasks, %.1f status polls per task (max %d), %s; end noticed after median %.3f s, worst %.3f s (wall)'
          % (len(ls), sum(n) / len(n), max(n),
             'at most %.2f polls per second per task after its first second' % max(rates) if rates else 'no task ran longer than 2 s',
             statistics.median(ls), ls[-1]))
PYEOF
