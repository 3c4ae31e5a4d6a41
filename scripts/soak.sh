#!/usr/bin/env bash
# The longer reliability run behind the README's "Reliability" table: the crash-point loop, the race
# and straggler tests repeated SOAK_REPEATS times (default 3), then a long hypothesis fuzz of every
# endpoint (FUZZ_EXAMPLES per fuzz test, default 5000; FUZZ_SEED, default random).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
repeats="${SOAK_REPEATS:-3}"
for i in $(seq "$repeats"); do
  echo "== soak pass $i of $repeats: crash points, races, stragglers"
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/reliability/test_crash_safety.py \
    tests/reliability/test_races.py tests/reliability/test_stragglers.py
done
seed="${FUZZ_SEED:-$RANDOM}"
echo "== long fuzz: ${FUZZ_EXAMPLES:-5000} examples per test, seed $seed"
FEDLLM_FUZZ_EXAMPLES="${FUZZ_EXAMPLES:-5000}" FEDLLM_FUZZ_SEED="$seed" \
  .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/reliability/test_fuzz.py
