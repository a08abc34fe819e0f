#!/usr/bin/env bash
# The wheel knows its torch (issue 15, section 4), checked end to end without pytest:
#   1. a CPU-only wheel built against the active environment's torch (X.Y) has Requires-Dist torch==X.Y.*;
#   2. in a fresh venv with the CPU-only torch 2.13.0 wheel, that wheel (installed --no-deps, as a user forcing it
#      would) fails `pip check` on the pin and `import alignops` raises the one-sentence mismatch ImportError,
#      never a loader error; a _C the loader rejects gets the same advice appended to the loader's error;
#   3. `pip wheel .` with build isolation refuses with the clear sentence instead of compiling against a
#      downloaded torch.
# Run from the main venv (torch 2.14.1). Reuses the CMake dir build/wheel between runs (CUDA off): a rerun only
# recompiles what changed; the venv and wheels go to build/wheel_pin/.
# Exit 0 when every check holds; otherwise the first failing check is named on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_213="${TORCH_COMPAT_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
ROOT=build/wheel_pin
export PIP_DISABLE_PIP_VERSION_CHECK=1

fail() { echo "wheel_pin: FAIL: $*" >&2; exit 1; }

[ -f "$WHEEL_213" ] || fail "$WHEEL_213 not found (set TORCH_COMPAT_WHEEL)"
BUILD_TORCH=$(python -c "import torch; print(torch.__version__)")
BUILD_MINOR=$(python -c "import torch; print('.'.join(torch.__version__.split('+')[0].split('.')[:2]))")
[ "$BUILD_MINOR" != "2.13" ] || fail "run this from an environment whose torch is not 2.13 (the mismatch needs two)"

# --- 1. the wheel and its pin ------------------------------------------------------------------------------------
rm -rf "$ROOT/dist"
ALIGNOPS_ENABLE_CUDA=OFF pip wheel -q --no-build-isolation --no-deps . -w "$ROOT/dist" -Cbuild-dir=build/wheel
WHEEL=$(ls "$ROOT"/dist/alignops-*.whl)
REQUIRES=$(python -c "import re, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
print('\n'.join(l for n in z.namelist() if n.endswith('.dist-info/METADATA') for l in z.read(n).decode().splitlines() \
if re.match(r'Requires-Dist: torch(?![-\w])', l)))" "$WHEEL")
[ "$REQUIRES" = "Requires-Dist: torch==$BUILD_MINOR.*" ] \
  || fail "METADATA of $WHEEL has '$REQUIRES', expected 'Requires-Dist: torch==$BUILD_MINOR.*'"
echo "wheel_pin: ok: $(basename "$WHEEL") built against torch $BUILD_TORCH says $REQUIRES"

# --- 2. that wheel under torch 2.13.0+cpu ------------------------------------------------------------------------
python3 -m venv --clear "$ROOT/venv213"
V="$ROOT/venv213/bin"
"$V/pip" install -q "$WHEEL_213" numpy
"$V/pip" install -q --no-deps "$WHEEL"
if CHECK=$("$V/pip" check 2>&1); then fail "pip check accepted alignops pinned to $BUILD_MINOR next to torch 2.13"; fi
grep -q "alignops 0.1.0 has requirement torch==$BUILD_MINOR.\*, but you have torch 2.13.0+cpu" <<<"$CHECK" \
  || fail "pip check said: $CHECK"
echo "wheel_pin: ok: pip check refuses the pair"

# Run outside the checkout so that `alignops` is the installed wheel, not the source tree.
if OUT=$(cd /tmp && "$OLDPWD/$V/python" -c "import alignops" 2>&1); then fail "import alignops succeeded under torch 2.13"; fi
LAST=$(tail -n 1 <<<"$OUT")
EXPECTED="ImportError: alignops was built against torch $BUILD_TORCH but torch 2.13.0+cpu is running: install torch==$BUILD_MINOR.* or rebuild it against this torch with \`pip install --no-build-isolation --force-reinstall --no-deps"
[[ "$LAST" == "$EXPECTED"* ]] || fail "import under torch 2.13 ended with: $LAST"
grep -q "undefined symbol" <<<"$OUT" && fail "the mismatch message came with a loader error: $OUT"
echo "wheel_pin: ok: $LAST"

# Without the recorded build info (an editable install made before it existed), only the wrapped _C load remains.
# Measured here: a CPU-only _C built against 2.14 loads under 2.13 with no loader error at all, so the recorded
# build info is the guard; reported below, not required. A _C the loader rejects (truncated here) must come with
# the same advice.
SITE=$("$V/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm "$SITE/alignops/_build_info.py"
if (cd /tmp && "$OLDPWD/$V/python" -c "import alignops") >/dev/null 2>&1; then
  echo "wheel_pin: note: without _build_info.py, _C built against $BUILD_TORCH loads under torch 2.13.0+cpu silently"
else
  echo "wheel_pin: note: without _build_info.py, _C built against $BUILD_TORCH fails to load under torch 2.13.0+cpu"
fi
SO=$(ls "$SITE"/alignops/_C*.so)
head -c 100 "$SO" > "$SO.part" && mv "$SO.part" "$SO"
if OUT=$(cd /tmp && "$OLDPWD/$V/python" -c "import alignops" 2>&1); then fail "a truncated _C loaded"; fi
LAST=$(tail -n 1 <<<"$OUT")
[[ "$LAST" == ImportError:*"; alignops' compiled extension could not be loaded: it was built against an unrecorded torch and torch 2.13.0+cpu is running, so rebuild it against this torch with \`pip install --no-build-isolation --force-reinstall --no-deps"* ]] \
  || fail "the loader failure ended with: $LAST"
echo "wheel_pin: ok: ${LAST:0:200}..."

# --- 3. build isolation is refused, not silently compiled against another torch ---------------------------------
if OUT=$("$V/pip" wheel --no-deps . -w "$ROOT/isolated" 2>&1); then fail "an isolated build succeeded"; fi
grep -q "alignops: torch is not importable in this build environment (build isolation hides the installed torch 2.13.0+cpu" \
  <<<"$OUT" || fail "the isolated build failed without the sentence: $(tail -n 20 <<<"$OUT")"
echo "wheel_pin: ok: the isolated build refuses: $(grep -o 'alignops: torch is not importable.*' <<<"$OUT" | head -n 1)"
echo "wheel_pin: all checks passed"
