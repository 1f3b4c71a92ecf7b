#!/usr/bin/env bash
# Create (or refresh) .venv/fakepve, the Python environment of the fake Proxmox VE test harness
# (tests/fakepve/harness.py). Idempotent: a stamp holds the sha256 of the requirements it was built
# from, so a rerun with unchanged requirements returns at once.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/tests/fakepve/requirements.txt"
venv="$root/.venv/fakepve"
stamp="$venv/.requirements.sha256"

# python3.11 is what the harness is tested with; any python3 >= 3.10 works for fakepve.
python="${FAKEPVE_PYTHON:-}"
if [[ -z "$python" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
  done
fi
if [[ -z "$python" ]]; then
  echo "fakepve-venv: no python3 found (need Python >= 3.10, e.g. 'apt-get install python3 python3-venv')" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "fakepve-venv: $python is $("$python" -V 2>&1); fakepve needs Python >= 3.10" >&2
  exit 1
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

# Test binaries may call this at the same time: one installs, the others wait and then find it done.
mkdir -p "$root/.venv"
exec 9>"$root/.venv/.fakepve.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "fakepve-venv: installing $req into $venv" >&2
if ! "$python" -m venv "$venv" 2>/dev/null; then
  echo "fakepve-venv: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2
  exit 1
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
# Prove the install is usable before stamping it.
"$venv/bin/python" -c 'import fakepve, asyncssh, cryptography, aiohttp'
echo "$want" > "$stamp"
echo "fakepve-venv: ready" >&2
