#!/usr/bin/env bash
# Re-records tests/transcripts/debian-12/{build,clone}.json: what a real Debian 12 guest answers to
# the commands sombrero's build (over SSH) and validation (through qemu-guest-agent) run. The
# guest-model replay test (tests/integration/fakepve_harness.rs, `the_model_answers_as_the_recorded_guest`)
# compares tests/fakepve/guest.py against them, so run this after changing what the build or the
# validation sends, then fix the model until the replay passes.
#
# The image and its apt repository come from scripts/real-guest-image.sh (its last stdout line is
# the cache directory), or from REAL_GUEST_CACHE. QEMU under TCG, two boots: ~6-10 minutes on a
# loaded 2-core machine. QEMU is killed on exit; nothing is left running.
#
# Usage: scripts/record-guest-transcripts.sh [--keep]   (--keep leaves the work dir with the logs)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

for tool in qemu-system-x86_64 qemu-img xorriso ssh ssh-keygen python3; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "record-guest-transcripts: $tool is missing: apt-get install qemu-system-x86 qemu-utils xorriso openssh-client python3" >&2
        exit 1
    }
done

cache="${REAL_GUEST_CACHE:-}"
if [[ -z "$cache" ]]; then
    if [[ ! -x "$ROOT/scripts/real-guest-image.sh" ]]; then
        echo "record-guest-transcripts: no scripts/real-guest-image.sh; set REAL_GUEST_CACHE to a directory holding debian-12.qcow2, repo/ and image.env" >&2
        exit 1
    fi
    cache="$("$ROOT/scripts/real-guest-image.sh" | tail -n 1)"
fi
for f in debian-12.qcow2 repo/InRelease image.env; do
    [[ -e "$cache/$f" ]] || { echo "record-guest-transcripts: $cache/$f is missing (run scripts/real-guest-image.sh)" >&2; exit 1; }
done

exec python3 "$ROOT/scripts/record_guest_transcripts.py" --cache "$cache" --out "$ROOT/tests/transcripts/debian-12" "$@"
