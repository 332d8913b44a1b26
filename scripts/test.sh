#!/usr/bin/env bash
# Run the default (fast) test suite; slow tests are opt-in: scripts/test.sh -m slow
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 MPLBACKEND=Agg
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): treating as success"
  exit 0
fi
exit "$rc"
