#!/usr/bin/env bash
# The GPU plan in one call.  On the device machine, from the repository root:
#     bash scripts/device.sh tests bench tune
# tests: every generated suite against the float64 reference (+ the unit tests);
# bench: `attngen bench run` on the issue's shapes; tune: tile sweep per shape;
# hf: tiny transformers models with attngen vs eager (logits, greedy generation);
# features: what softcap, sinks and a chunk offset cost next to the plain kernel;
# profile: Nsight Compute on the shape A, B and C kernels (one launch each; PROFILE_SHAPES);
# train: forward + backward of A, B, B', C against FlexAttention and SDPA (TRAIN_SEQ; TRAIN_FLAGS=--graph
#        times CUDA-graph replays).
# host: host time of one call (scripts/host_time.py --breakdown; the GPU idles).
# paged: serving from a paged cache (shapes A and C), the launcher's key splits against fixed
#        counts, and the paged key-loop variants against the contiguous kernel.
# Logs and JSON go to $OUT (the device tool brings them back; without it, a fresh private
# directory that the script names).  The exit status is non-zero when a step's tests fail.
set -uo pipefail
source .gpu/env.sh
export ATTNGEN_PATH=$PWD/build/attngen ATTNGEN_CACHE_DIR=${ATTNGEN_CACHE_DIR:-$PWD/build/cache}
if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/attngen-out.XXXXXX") || exit 1; echo "logs in $OUT"; fi
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
# compiled as users build them: every suite and bench below runs the cubins `attngen build` writes
python -m attngen build variants/*.yaml tests/variants/*.yaml --out build/attngen -q >/dev/null

for step in "$@"; do
  case $step in
    tests)
      rm -f "$OUT/errs.jsonl"
      ATTNGEN_TEST_LOG=$OUT/errs.jsonl python -m pytest -m gpu build/attngen -q -n 8 -p no:cacheprovider \
        > "$OUT/pytest.log" 2>&1
      rc=$?; [ $rc -eq 0 ] || { echo "pytest failed (exit $rc)"; status=1; }
      tail -n 15 "$OUT/pytest.log"
      python - "$OUT/errs.jsonl" <<'PY'
import json, sys
fwd, grad, count, lse = {}, {}, {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    k = r["kernel"]
    if "lse_err" in r:     # a paged variant's log-sum-exp (max abs error, and eager's)
        ours, eager = lse.get(k, (0.0, 0.0))
        lse[k] = (max(ours, r["lse_err"]), max(eager, r["lse_eager_err"]))
    elif "grad" in r:
        g = grad.setdefault((k, r["mode"]), {})
        ours, eager = g.get(r["grad"], (0.0, 0.0))
        g[r["grad"]] = (max(ours, r["rel_err"]), max(eager, r["eager_err"]))
    else:
        fwd[k] = max(fwd.get(k, 0.0), r["rel_err"])
        count[k] = count.get(k, 0) + 1
print(f"{'kernel':<60} cases  fwd err   mode   worst gradient err (bf16/fp16 eager's) per input")
for k in sorted(fwd):
    for mode in ("default", "deterministic"):
        g = "  ".join(f"d{n} {o:.1e} ({e:.1e})" for n, (o, e) in sorted(grad.get((k, mode), {}).items()))
        print(f"{k:<60} {count[k]:>5}  {fwd[k]:.2e}  {mode[:5]}  {g}")
for k, (ours, eager) in sorted(lse.items()):
    print(f"{k:<60} log-sum-exp max abs err {ours:.1e} (eager's {eager:.1e})")
PY
      ;;
    bench) python -m attngen.bench run --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/bench.log" ;;
    hf)
      python -m pytest -m gpu tests -q -s -p no:cacheprovider 2>&1 | tee "$OUT/hf.log" | grep -v -i warn | tail -n 30
      rc=${PIPESTATUS[0]}; [ $rc -eq 0 ] || { echo "pytest failed (exit $rc)"; status=1; } ;;
    features)
      python -m attngen.bench run --preset A --preset C --preset C-sinks --preset G2 --preset G2-softcap \
        --seq 8192 32768 --impl attngen flex --json "$OUT/features.json" 2>&1 | grep -v -i warn | tee "$OUT/features.log"
      python -m attngen.bench run --preset A-chunk --impl attngen flex --json "$OUT/chunk.json" 2>&1 \
        | grep -v -i warn | tee -a "$OUT/features.log" ;;
    profile)
      # PROFILE_PASS=bwd PROFILE_LAUNCHES=3: the forward, then the dQ and dK/dV kernels
      pass=${PROFILE_PASS:-fwd} launches=${PROFILE_LAUNCHES:-1}
      for p in ${PROFILE_SHAPES:-A:16384 B:32768 C:32768}; do
        set -- ${p/:/ }
        log="$OUT/ncu-${1//\'/p}-$pass.txt"
        ncu --clock-control none -k regex:_g[0-9]+_d[0-9]+_ -c "$launches" --section SpeedOfLight --section Occupancy \
          --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
          --section WarpStateStats python -m attngen.bench run --preset "$1" --seq "$2" --impl attngen \
          --pass "$pass" > "$log" 2>&1
        grep -E "_g[0-9]+_d[0-9]+_|Duration|Throughput|Pipe|Occupancy|Registers|Shared Memory|Warp Cycles|Stall|Block Size|Grid Size|Waves" \
          "$log" | head -n $((60 * launches))
      done ;;
    train)
      for p in A B "B'" C; do
        python -m attngen.bench run --preset "$p" --seq ${TRAIN_SEQ:-8192 32768} --impl attngen flex sdpa-flash \
          --pass fwd+bwd ${TRAIN_FLAGS:-} --json "$OUT/train-${p//\'/p}.json" 2>&1 | grep -v -i warn | tee -a "$OUT/train.log"
      done ;;
    host) python scripts/host_time.py --breakdown 2>&1 | grep -v -i warn | tee "$OUT/host.log" ;;
    paged)
      python -m attngen.bench paged --json "$OUT/paged-A.json" 2>&1 | grep -v -i warn | tee "$OUT/paged.log"
      python -m attngen.bench paged --preset C --only prefill decode --batch 16 64 --context 8192 \
        --json "$OUT/paged-C.json" 2>&1 | grep -v -i warn | tee -a "$OUT/paged.log"
      python -m attngen.bench paged --only decode --batch 1 16 24 64 --context 8192 --splits 1 2 3 4 8 \
        --json "$OUT/paged-splits.json" 2>&1 | grep -v -i warn | tee -a "$OUT/paged.log"
      for tiles in "" 64x64o1c1p2; do   # D = 256: the tuned tiles (8 worker warps) and the same without
        python -m attngen.bench paged --preset B --only prefill decode --page 16 64 --batch 16 64 --context 8192 \
          ${tiles:+--tiles $tiles} --json "$OUT/paged-B${tiles:+-$tiles}.json" 2>&1 | grep -v -i warn | tee -a "$OUT/paged.log"
      done
      python scripts/paged_loop_variants.py 2>&1 | grep -v -i warn | tee -a "$OUT/paged.log" ;;
    tune) python -m attngen.bench tune --json "$OUT/tune.json" ${TUNE_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/tune.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
