#!/usr/bin/env bash
# The GPU plan in one call.  On the device machine, from the repository root:
#     bash scripts/device.sh tests bench tune
# tests: every generated suite against the float64 reference (+ the unit tests);
# bench: `attngen bench run` on the issue's shapes; tune: tile sweep per shape.
# Logs and JSON go to $OUT (the device tool brings them back).
set -uo pipefail
source .gpu/env.sh
export ATTNGEN_PATH=$PWD/build/attngen ATTNGEN_CACHE_DIR=/tmp/attngen-cache
OUT=${OUT:-/tmp/attngen-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python -m attngen build variants/*.yaml tests/variants/*.yaml --out build/attngen --no-compile -q >/dev/null

for step in "$@"; do
  case $step in
    tests)
      rm -f "$OUT/errs.jsonl"
      ATTNGEN_TEST_LOG=$OUT/errs.jsonl python -m pytest -m gpu build/attngen -q -n 8 -p no:cacheprovider \
        > "$OUT/pytest.log" 2>&1
      tail -n 15 "$OUT/pytest.log"
      python - "$OUT/errs.jsonl" <<'PY'
import json, sys
worst, count = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    worst[r["kernel"]] = max(worst.get(r["kernel"], 0.0), r["rel_err"])
    count[r["kernel"]] = count.get(r["kernel"], 0) + 1
print(f"{'kernel':<52} cases  worst rel err")
for k in sorted(worst):
    print(f"{k:<52} {count[k]:>5}  {worst[k]:.2e}")
PY
      ;;
    bench) python -m attngen.bench run --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/bench.log" ;;
    tune) python -m attngen.bench tune --json "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/tune.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
