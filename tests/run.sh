#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
#
#   bash tests/run.sh            # both lanes below, each in a fresh venv (what CI runs)
#   bash tests/run.sh image      # one lane: the GPU machine's image (tests/constraints/image.txt)
#   bash tests/run.sh latest     # one lane: the newest releases the index serves (tests/constraints/latest.txt)
#   bash tests/run.sh current    # no new venv: test the Python in $PYTHON (default python3) as it is
#
# Every lane:
# 1. makes a clean venv (.lanes/<lane>, git-ignored) and installs qpeft[dev] under the lane's constraints file;
#    the image lane uses Python 3.12 when the machine has it (the image's Python), the latest lane the default;
# 2. prints the versions it got, then checks the layering (lint-imports) and lints (ruff check);
# 3. compiles and links the CUDA extension with nvcc against that torch, for sm_90 (nothing runs it without a
#    GPU; a compile or link error fails here; the build is cached per torch/CUDA/arch);
# 4. runs the CPU suite (PyTorch reference paths, interop with bitsandbytes / PEFT / transformers, every Triton
#    kernel compiled offline for sm_90 with its spills checked);
# 5. runs the Triton kernels on CPU tensors under the Triton interpreter (small shapes, fp16/fp32).
# It ends with one "N passed, N failed" line per lane and suite, and exits non-zero if any lane failed.
#
# Installs go through uv (found on PATH, else bootstrapped into .lanes/uv from PyPI): with a warm cache a lane
# installs in about 20 s, where pip copies ~5 GB of torch per venv. uv does not read pip's machine-wide
# constraint file, so each lane's own constraints file is the only cap it has.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LANES_DIR=${QPEFT_LANES_DIR:-$ROOT/.lanes}
LANES=${*:-image latest}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
for lane in $LANES; do
  case "$lane" in image|latest|current) ;; *) echo "unknown lane '$lane' (expected image, latest or current)" >&2; exit 2;; esac
done
mkdir -p "$LANES_DIR"
SUMMARY=()
failed=0

find_uv() {
  if command -v uv >/dev/null 2>&1; then UV=$(command -v uv); return; fi
  UV=$LANES_DIR/uv/bin/uv
  if [ ! -x "$UV" ]; then
    echo "== bootstrapping uv into $LANES_DIR/uv"
    python3 -m venv "$LANES_DIR/uv" && "$LANES_DIR/uv/bin/python" -m pip install -q uv || { echo "cannot install uv" >&2; exit 1; }
  fi
}

# python_for VERSION: an interpreter of that minor version, from PATH or pyenv (pyenv's shims exist for every
# installed version but fail unless it is selected, so each candidate is run once).
python_for() {
  local v=$1 c
  for c in "python$v" "$(pyenv root 2>/dev/null)/versions/$v"*/bin/"python$v"; do
    if "$c" -c 'import sys' >/dev/null 2>&1; then command -v "$c" 2>/dev/null || echo "$c"; return 0; fi
  done
  return 1
}

# run_suite LANE NAME PY ARGS...: runs pytest, keeps its last summary line ("N passed, N failed in S")
run_suite() {
  local lane=$1 name=$2 log="$LANES_DIR/$1-$2.log" rc line; shift 2
  "$@" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  line=$(grep -E '^=*[ ]*[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -1)
  count() { echo "$line" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+' || echo 0; }
  if [ -n "$line" ]; then
    line="$(count passed) passed, $(count failed) failed, $(count 'errors?') errors, $(count skipped) skipped"
  fi
  # pytest exits 5 when a selection is empty: not an error for a pass split by marker
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed=1; line="${line:-no summary} (exit $rc)"; fi
  SUMMARY+=("$lane $name: ${line:-no tests}")
}

run_lane() {
  local lane=$1 py venv
  echo
  echo "######## lane: $lane"
  if [ "$lane" = current ]; then
    py=${PYTHON:-python3}
    echo "== install (into $py as it is)"
    $py -m pip install -q -e ".[dev]" || { SUMMARY+=("$lane: install failed"); failed=1; return; }
  else
    find_uv
    venv=$LANES_DIR/$lane
    local want=() base
    if [ "$lane" = image ]; then
      if base=$(python_for 3.12); then want=(--python "$base")
      else echo "WARNING: no Python 3.12 on this machine; the image lane runs on the default Python" >&2; fi
    fi
    [ ${#want[@]} -eq 0 ] && want=(--python "$(command -v python3)")
    echo "== fresh venv $venv"
    "$UV" venv -q --clear "${want[@]}" "$venv" || { SUMMARY+=("$lane: venv failed"); failed=1; return; }
    py=$venv/bin/python
    echo "== install qpeft[dev] with tests/constraints/$lane.txt"
    "$UV" pip install -q --python "$py" -c "tests/constraints/$lane.txt" -e ".[dev]" pip \
      || { SUMMARY+=("$lane: install failed"); failed=1; return; }
  fi
  echo "== versions"
  local versions
  versions=$($py - <<'EOF'
import importlib.metadata as md, platform
names = ["torch", "triton", "transformers", "peft", "bitsandbytes", "numpy"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "absent"
print(" ".join([f"python {platform.python_version()}"] + [f"{n} {version(n)}" for n in names]))
EOF
) || { SUMMARY+=("$lane: python does not run"); failed=1; return; }
  echo "$versions"
  SUMMARY+=("$lane versions: $versions")

  echo "== lint: the package's layering (lint-imports, contracts in pyproject.toml) and ruff check"
  local lint_ok=1
  (cd "$ROOT" && "$py" -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())") \
    || lint_ok=0
  (cd "$ROOT" && "$py" -m ruff check .) || lint_ok=0
  if [ $lint_ok = 1 ]; then SUMMARY+=("$lane lint: clean"); else SUMMARY+=("$lane lint: FAILED"); failed=1; fi

  echo "== CUDA extension: compile and link (sm_90)"
  if command -v nvcc >/dev/null 2>&1 || [ -n "${CUDA_HOME:-}" ]; then
    if TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" $py -m qpeft.build; then
      SUMMARY+=("$lane CUDA extension: built")
    else SUMMARY+=("$lane CUDA extension: FAILED"); failed=1; fi
  else
    echo "nvcc not found: cannot compile the CUDA extension" >&2
    SUMMARY+=("$lane CUDA extension: nvcc not found"); failed=1
  fi

  echo "== tests (CPU reference paths, offline sm_90 compiles)"
  run_suite "$lane" cpu $py -m pytest tests -q -p no:cacheprovider -m "not triton"

  echo "== Triton kernels under TRITON_INTERPRET=1"
  local reason
  reason=$($py -c "from qpeft._versions import interpreter_reason; print(interpreter_reason() or '')")
  if [ -n "$reason" ] && [ "$lane" != current ]; then
    echo "($reason: numpy pinned by tests/constraints/interpreter-numpy.txt for this suite)"
    "$UV" pip install -q --python "$py" -c "tests/constraints/$lane.txt" -c tests/constraints/interpreter-numpy.txt \
      numpy || { SUMMARY+=("$lane interpreter: numpy install failed"); failed=1; return; }
  fi
  TRITON_INTERPRET=1 QPEFT_BACKEND=triton run_suite "$lane" interpreter $py -m pytest tests -q -p no:cacheprovider -m triton
}

for lane in $LANES; do run_lane "$lane"; done

echo
echo "######## summary"
printf '%s\n' "${SUMMARY[@]}"
exit $failed
