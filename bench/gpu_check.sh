#!/usr/bin/env bash
# The GPU machine's check in one device call of about 8 minutes: carried peers -> build (sm_90) -> the CUDA and
# Triton test files, each with its own timeout -> `alignops bench --device cuda` per family, each with a time
# budget -> everything packed into OUT_DIR/summary.txt (one screen, printed last) and OUT_DIR/results.tar.gz
# (logs, CSVs, plots). Packing is redone after every phase, so a run cut short still returns what it had.
#
# Usage: bash bench/gpu_check.sh OUT_DIR          (device tool: carry [".whl"], timeout_s 540)
# Environment (all optional):
#   GPU_CHECK_BUDGET_S     the whole run's target, seconds (480); the bench gets what build and tests leave
#   GPU_CHECK_TEST_BUDGET  seconds for all test files (120); GPU_CHECK_TEST_TIMEOUT per file (90);
#                          GPU_CHECK_TEST_JOBS files at a time (4); GPU_CHECK_TESTS=0 skips the tests
#   GPU_CHECK_FAMILIES     "family:seconds ..." in order, replacing the plan below (seconds are shares)
#   ALIGNOPS_GIT_SHA       the commit, when the copied tree has no .git
#   ALIGNOPS_GPU_CHECK_DRYRUN=1  a CPU rehearsal of the plumbing: CUDA-off build, short test timeouts,
#                          `bench --device cpu --quick` on two families
# .whl/ (bench/fetch_gpu_wheels.sh) holds the peers the machine lacks; without it the run goes on, tests
# importorskip them and the bench leaves their rows out.
set -uo pipefail
OUT="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
T0=$(date +%s)
DRY="${ALIGNOPS_GPU_CHECK_DRYRUN:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 900 || echo 480)}"  # a 2-core CPU build takes ~5 min
W="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # the scratch that results.tar.gz packs
mkdir -p "$W/tests" "$W/bench"
STATUS="$W/status.txt"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  DEVICE=cpu QUICK=--quick
  PLAN="${GPU_CHECK_FAMILIES:-preference:40 ot:20}"
  EXTRA=""
  TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-25}" TEST_JOBS="${GPU_CHECK_TEST_JOBS:-1}"
  export ALIGNOPS_ENABLE_CUDA="${ALIGNOPS_ENABLE_CUDA:-OFF}" ALIGNOPS_BENCH_MIN_RUN_S=0.02
else
  DEVICE=cuda QUICK="--full"  # the default plan is the representative one: the card gets the README's sizes
  # The issue's GPU targets first (selective_logprobs, fused linear DPO, forced_align, Sinkhorn, skip_ffn);
  # the other families only with the time left over.
  PLAN="${GPU_CHECK_FAMILIES:-preference:60 fused_linear:80 ctc:50 ot:60 skip:50}"
  EXTRA=""
  [ -z "${GPU_CHECK_FAMILIES:-}" ] \
    && EXTRA="policy:25 ctc_posteriors:25 wasserstein:20 metrics:20 watermark:15 ctc_segmentation:20 ppo:15"
  TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-90}" TEST_JOBS="${GPU_CHECK_TEST_JOBS:-4}"
  export ALIGNOPS_ENABLE_CUDA="${ALIGNOPS_ENABLE_CUDA:-ON}" ALIGNOPS_BENCH_MIN_RUN_S=0.2
fi
TEST_BUDGET="${GPU_CHECK_TEST_BUDGET:-120}"
if ! command -v nvcc > /dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"  # CMake's check_language(CUDA) looks on PATH (or CUDACXX)
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export ALIGNOPS_BENCH_TARGETS_FILE=1

now() { date +%s; }
note() { echo "$*" | tee -a "$STATUS"; }

summarize() {  # the one-screen summary: machine, bench table, targets, then the status lines (last)
  echo "alignops gpu_check $(date -u +%FT%TZ), $(( $(now) - T0 )) s of a ${BUDGET} s budget"
  cat "$W/nvidia-smi.txt" 2>/dev/null
  python3 - "$W/bench" <<'PY'
import csv, glob, math, os, sys
d = sys.argv[1]
def num(x, fmt):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(v) else fmt.format(v)
rows = []
for path in sorted(glob.glob(os.path.join(d, "*.csv"))):
    with open(path) as f:
        rows += list(csv.DictReader(f))
print("\n== bench: median ms; vs base = baseline median / this; HBM = min bytes / (t * 4.8 TB/s); "
      "peak = FLOPs / (t * peak of the unit) ==")
fmt = "{:<17} {:<30} {:<4} {:<7} {:<24} {:>9} {:>8} {:>6} {:>6}"
print(fmt.format("op", "shape", "type", "mode", "provider", "ms", "vs base", "HBM", "peak"))
family = None
failed = []
for r in rows:
    if r["family"] != family:
        family = r["family"]
        print(f"-- {family} ({r['device']}, torch {r['torch']}, {r['git_sha']})")
    dt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}.get(r["dtype"], r["dtype"][:4])
    print(fmt.format(r["op"][:17], r["shape"][:30], dt, r["mode"], r["provider"][:24], num(r["median_ms"], "{:.3f}"),
                     num(r["ratio"], "{:.2f}x"), num(r.get("hbm_frac"), "{:.0%}"), num(r.get("peak_frac"), "{:.0%}")))
    if r.get("error"):
        failed.append(f"  {r['family']} {r['op']} {r['shape']} {r['provider']}: {r['error'][:150]}")
if not rows:
    print("(no bench rows)")
if failed:
    print(f"\n== {len(failed)} bench cases FAILED (NaN rows) ==")
    print("\n".join(failed))
targets = sorted(glob.glob(os.path.join(d, "*_targets.txt")))
if targets:
    print("\n== targets (each family's summary) ==")
    for path in targets:
        print(f"-- {os.path.basename(path)[:-len('_targets.txt')]}")
        with open(path) as f:
            lines = f.read().rstrip().splitlines()
        print("\n".join(lines[:12]))
        if len(lines) > 12:
            print(f"... {len(lines) - 12} more lines in results.tar.gz: bench/{os.path.basename(path)}")
PY
  echo
  echo "== status =="
  cat "$STATUS"
}

pack() {
  summarize > "$W/summary.txt" 2>&1
  cp "$W/summary.txt" "$OUT/summary.txt"
  tar -C "$W" -czf "$OUT/results.tar.gz.part" . && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

# ---- the machine and the tree ---------------------------------------------------------------------------
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$W/nvidia-smi.txt" 2>&1
else
  echo "nvidia-smi: none" > "$W/nvidia-smi.txt"
fi
GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
SHA="${ALIGNOPS_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"  # given: a copied tree can sit inside another checkout
export ALIGNOPS_GIT_SHA="$SHA"
DIRTY="$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
note "gpu: ${GPU:-none}; $(nproc) cores; dry run: $DRY"
note "tree: ${SHA}$( [ "$DIRTY" -gt 0 ] 2>/dev/null && echo " + $DIRTY modified files (uncommitted)")"
git status --porcelain 2>/dev/null > "$W/git_status.txt"
git diff 2>/dev/null > "$W/git_diff.patch"

# ---- peers carried as wheels (installed before the build, so nothing rebuilds against them) ------------
SITE="${ALIGNOPS_PEER_SITE:-/tmp/site}"
if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      > "$W/peers.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    note "peers: $(cd .whl && ls -- *.whl | sed -E 's/-(py3|cp3).*//' | tr '\n' ' ')(from .whl, on PYTHONPATH)"
  else
    note "peers: installing .whl FAILED ($(tail -n 1 "$W/peers.log")); going on without them"
  fi
else
  note "peers: no .whl carried; tests importorskip them, the bench leaves their rows out"
fi
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
                                    "CUDA", torch.version.cuda)' 2>&1 | head -n 1 | { read -r line; note "$line"; }
python3 -c 'import triton; print("triton", triton.__version__)' 2>/dev/null \
  | { read -r line; note "${line:-triton: none}"; }

# ---- build ----------------------------------------------------------------------------------------------
t=$(now)
BUILD_DIR="${GPU_CHECK_BUILD_DIR:-build/gpu}"
timeout -k 10 "${GPU_CHECK_BUILD_TIMEOUT:-330}" python3 -m pip install -v --no-build-isolation --no-deps -e . \
  "-Cbuild-dir=$BUILD_DIR" > "$W/build.log" 2>&1
rc=$?
gen="$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null)"
if [ $rc -ne 0 ]; then
  note "build: FAILED (exit $rc) after $(( $(now) - t )) s, ALIGNOPS_ENABLE_CUDA=$ALIGNOPS_ENABLE_CUDA; last lines:"
  grep -E "error|Error|FAILED" "$W/build.log" | tail -n 15 | tee -a "$STATUS"
  note "VERDICT: FAIL (build)"
  pack
  cat "$OUT/summary.txt"
  exit 1
fi
note "build: ok in $(( $(now) - t )) s (${gen:-?}, -j$CMAKE_BUILD_PARALLEL_LEVEL," \
  "CUDA $ALIGNOPS_ENABLE_CUDA, arch $TORCH_CUDA_ARCH_LIST)"
python3 -m alignops.cli info > "$W/info.txt" 2>&1 || note "alignops info: FAILED (see info.txt)"
note "$(grep -E '^CUDA kernels' "$W/info.txt" | tr -s ' ')"
pack

# ---- tests: each file alone, with its own timeout, a few at a time --------------------------------------
FAILS=0
run_test_file() {  # file timeout_s
  local name s
  name="$(basename "$1" .py)"
  s=$(now)
  timeout -k 5 "$2" python3 -m pytest -x -q -ra -p no:cacheprovider "$1" > "$W/tests/$name.log" 2>&1
  echo "$? $(( $(now) - s )) $2" > "$W/tests/$name.rc"
}
if [ "${GPU_CHECK_TESTS:-1}" = 1 ]; then
  test_end=$(( $(now) + TEST_BUDGET ))
  for f in tests/test_*_cuda.py tests/test_*_triton.py; do
    [ -e "$f" ] || continue
    while [ "$(jobs -rp | wc -l)" -ge "$TEST_JOBS" ]; do wait -n; done
    limit=$(( test_end - $(now) ))
    [ "$limit" -gt "$TEST_TIMEOUT" ] && limit=$TEST_TIMEOUT
    if [ "$limit" -lt 10 ]; then
      echo "notrun 0 0" > "$W/tests/$(basename "$f" .py).rc"
      continue
    fi
    run_test_file "$f" "$limit" &
  done
  wait
  note "tests (pytest -x per file; exit 0 ok, 1 failures, 2 collection error, 5 none collected, 124 timeout):"
  for rcf in "$W"/tests/*.rc; do
    [ -e "$rcf" ] || continue
    name="$(basename "$rcf" .rc)"
    read -r code secs limit < "$rcf"
    counts="$(tail -n 1 "$W/tests/$name.log" 2>/dev/null \
      | grep -oE '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed)' | tr '\n' ' ')"
    case "$code" in
      0) verdict=ok ;;
      5) verdict="no tests" ;;
      124|137) verdict="TIMEOUT (${limit} s)"; FAILS=$((FAILS + 1)) ;;
      notrun) verdict="NOT RUN (test budget spent)"; FAILS=$((FAILS + 1)) ;;
      *) verdict="FAILED (exit $code)"; FAILS=$((FAILS + 1)) ;;
    esac
    note "  $(printf '%-34s %-22s %4s s  %s' "$name" "$verdict" "$secs" "$counts")"
    first_fail="$(grep -m 1 -E '^(FAILED|ERROR) ' "$W/tests/$name.log" 2>/dev/null | cut -c1-160)"
    [ -n "$first_fail" ] && note "      $first_fail"
  done
  pack
fi

# ---- bench: one process per family (a crash or hang loses that family only), budgets shared pro rata -----
BENCH_FAILS=0
bench_end=$(( T0 + BUDGET - 15 ))
bench_family() {  # family seconds_wanted seconds_of_the_families_still_to_run
  local fam=$1 want=$2 rest=$3 rem budget hard s code
  rem=$(( bench_end - $(now) ))
  budget=$(( rem * want / rest ))
  [ "$budget" -gt "$want" ] && budget=$want
  budget=$(( budget - 10 ))  # start-up: torch, triton and the extension load
  if [ "$budget" -lt 10 ]; then
    note "  $fam: not run (bench budget spent)"
    return
  fi
  hard=$(( budget + 40 ))
  [ "$hard" -gt "$rem" ] && hard=$rem
  s=$(now)
  ALIGNOPS_BENCH_BUDGET_S=$budget timeout -k 10 "$hard" python3 -m alignops.cli bench --device "$DEVICE" $QUICK \
    --family "$fam" --out "$W/bench" > "$W/bench/$fam.log" 2>&1
  code=$?
  case "$code" in
    0) verdict=ok ;;
    124|137) verdict="KILLED after ${hard} s (rows measured before are kept)"; BENCH_FAILS=$((BENCH_FAILS + 1)) ;;
    *) verdict="exit $code (failed cases or a crash: see $fam.log)"; BENCH_FAILS=$((BENCH_FAILS + 1)) ;;
  esac
  note "  $(printf '%-17s %4s s of %4s s  %s' "$fam" "$(( $(now) - s ))" "$budget" "$verdict")"
  grep -q "time budget spent" "$W/bench/$fam.log" && note "      (budget reached: later cases not run)"
  pack
}
note "bench --device $DEVICE $QUICK (budget per family in s; a case past it is not started):"
for phase in "$PLAN" "$EXTRA"; do
  set -- $phase
  [ $# -eq 0 ] && continue
  [ "$phase" = "$EXTRA" ] && [ $(( bench_end - $(now) )) -lt 45 ] && { note "  extras not run: $EXTRA"; break; }
  rest=0
  for item in "$@"; do rest=$(( rest + ${item#*:} )); done
  for item in "$@"; do
    bench_family "${item%%:*}" "${item#*:}" "$rest"
    rest=$(( rest - ${item#*:} ))
  done
done

# ---- verdict --------------------------------------------------------------------------------------------
if [ "$FAILS" -eq 0 ] && [ "$BENCH_FAILS" -eq 0 ]; then
  note "VERDICT: PASS (build, tests, bench) in $(( $(now) - T0 )) s"
  code=0
else
  note "VERDICT: FAIL ($FAILS test files, $BENCH_FAILS bench families) in $(( $(now) - T0 )) s"
  code=1
fi
pack
rm -rf "$W"
cat "$OUT/summary.txt"
exit $code
