#!/usr/bin/env bash
# Every test tier but gpu, in two pytest sessions at once: the Slurm tier spends most of
# its time waiting on the scheduler (time-limit windows, requeue holds, job start-up), so
# it runs beside the CPU-bound tiers instead of after them. Its report is printed after
# the others'; the exit status fails if either session fails.
#   bash scripts/test-tiers.sh [pytest arguments for both sessions]
set -uo pipefail
PY=${PY:-python}
log=$(mktemp "${TMPDIR:-/tmp}/scilm-slurm-tier.XXXXXX")
"$PY" -m pytest -m "slurm and not gpu" "$@" >"$log" 2>&1 &
slurm=$!
trap 'kill "$slurm" 2>/dev/null; rm -f "$log"' INT TERM
"$PY" -m pytest -m "not slurm and not gpu" "$@"
rest=$?
wait "$slurm"
tier=$?
echo "== Slurm tier (ran beside the tiers above)"
cat "$log"
rm -f "$log"
# 5: the arguments selected no test of that session (e.g. a single non-Slurm test file)
ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }
ok "$rest" && ok "$tier"
