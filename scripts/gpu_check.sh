#!/usr/bin/env bash
# The GPU checks in one prepared run, for a lent machine with an NVIDIA GPU and NO network:
#   1. install the carried wheels (.whl/, made by scripts/gpu_wheels.sh) into a private
#      folder, offline, and put it and this checkout on PYTHONPATH (nothing is pip-installed
#      into the machine's Python; hpsearch is imported from this checkout);
#   2. a short header: the GPU, torch, CUDA;
#   3. tests/test_gpu.py;
#   4. the GPU part of the benchmark (trials_per_device 1, 2, 4 on one GPU);
#   5. a compact summary.
# Everything also goes to OUT/gpu-check.log. The whole run stays under 5 minutes: the tests and
# the benchmark get what is left of GPU_CHECK_BUDGET seconds (the benchmark falls back to
# --quick, or is skipped, when little is left).
#
# Usage: bash scripts/gpu_check.sh [OUT]   (OUT defaults to $OUT, else results/gpu-check)
# Env:   PYTHON (default python3), WHEELS (default .whl), HPSEARCH_SITE (default
#        /tmp/hpsearch-site), GPU_CHECK_BUDGET (default 285 seconds).
# Exit:  0 all passed; 1 a test or the benchmark failed; 2 the machine cannot run the checks.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT_DIR="${1:-${OUT:-results/gpu-check}}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${HPSEARCH_SITE:-/tmp/hpsearch-site}"
BUDGET="${GPU_CHECK_BUDGET:-285}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu-check.log"

step() { echo; echo "== [$((SECONDS))s] $*"; }
left() { echo $((BUDGET - SECONDS)); }

# The carried wheels to install: those whose package the machine lacks, or has at a version
# that some requirement (pyproject.toml's, or a carried wheel's) rejects. Imports no torch.
select_wheels() {
    "$PY" - "$WHEELS" <<'EOF'
import importlib.metadata as md
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    except ImportError:  # nothing to compare versions with: install every carried wheel
        print("\n".join(str(p) for p in sorted(Path(sys.argv[1]).glob("*.whl"))))
        sys.exit(0)

wheels = {}
for path in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(path.name)
    wheels[name] = (path, version)

lines = []
try:
    import tomllib

    lines += tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
except Exception as err:  # only a finer choice is lost
    print(f"note: pyproject.toml not read ({err})", file=sys.stderr)
for path, _ in wheels.values():
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines += Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
specs = {}
for line in lines:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": ""}):
        specs.setdefault(canonicalize_name(req.name), []).append(req.specifier)

def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

chosen, kept = [], []
for name, (path, version) in sorted(wheels.items()):
    have = installed(name)
    if have and all(s.contains(have, prereleases=True) for s in specs.get(name, [])):
        kept.append(f"{name} {have}")
    else:
        chosen.append(str(path))
for name, sets in sorted(specs.items()):
    if name not in wheels and installed(name) is None:
        print(f"warning: {name} is needed ({', '.join(map(str, sets)) or 'any'}) but "
              "neither installed nor carried", file=sys.stderr)
print(f"carried {len(wheels)} wheels; {len(kept)} already here: {', '.join(kept) or '-'}",
      file=sys.stderr)
print("\n".join(chosen))
EOF
}

# After the install: every requirement of hpsearch, and of what was installed from the
# wheels, resolves to an importable distribution of an accepted version.
check_requirements() {
    "$PY" - "$SITE" <<'EOF'
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

site = Path(sys.argv[1]).resolve()
todo = list(tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"])
seen, problems = set(), []
while todo:
    req = Requirement(todo.pop())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    name = canonicalize_name(req.name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        problems.append(f"{req} (required) is not installed")
        continue
    if not req.specifier.contains(dist.version, prereleases=True):
        problems.append(f"{req} (required) but {dist.version} is the one imported")
    if name in seen:
        continue
    seen.add(name)
    # Follow the carried packages' own requirements; trust the machine's (torch's) installs.
    if Path(str(dist.locate_file(""))).resolve() == site:
        todo += dist.requires or []
print("\n".join(f"error: {p}" for p in problems) or "requirements: all met")
sys.exit(1 if problems else 0)
EOF
}

install_wheels() {
    step "packages (offline, from $WHEELS/ into $SITE)"
    if ! command -v "$PY" >/dev/null; then
        echo "error: $PY not found (set PYTHON)" >&2; return 2
    fi
    "$PY" -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
    rm -rf "$SITE" && mkdir -p "$SITE" || return 2
    local chosen=() list
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        list=$(select_wheels) || { echo "error: cannot read the wheels in $WHEELS/" >&2; return 2; }
        [ -n "$list" ] && mapfile -t chosen <<<"$list"
    else
        echo "note: no wheels in $WHEELS/ (make them with scripts/gpu_wheels.sh on a" \
             "machine with network access, and carry $WHEELS along)"
    fi
    if [ "${#chosen[@]}" -gt 0 ]; then
        echo "installing ${#chosen[@]}: $(printf '%s\n' "${chosen[@]##*/}" | cut -d- -f1-2 |
                                          tr '\n' ' ')"
        if "$PY" -m pip --version >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --disable-pip-version-check --target "$SITE" "${chosen[@]}" || {
                echo "error: the offline install from $WHEELS/ failed" >&2; return 2; }
        else
            echo "note: no pip for $PY: unpacking the wheels instead"
            "$PY" - "$SITE" "${chosen[@]}" <<'EOF' || return 2
import shutil
import sys
import zipfile
from pathlib import Path

site = Path(sys.argv[1])
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
for data in site.glob("*.data"):
    for part in ("purelib", "platlib"):
        if (data / part).is_dir():
            shutil.copytree(data / part, site, dirs_exist_ok=True)
    shutil.rmtree(data)
EOF
        fi
    fi
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    check_requirements || return 2
    "$PY" -c 'import optuna, pydantic, plotly, mnist1d.data, yaml, joblib, sklearn
print("optuna", optuna.__version__, "| pydantic", pydantic.VERSION, "| plotly",
      plotly.__version__)' || { echo "error: the dependencies do not import" >&2; return 2; }
}

header() {
    step "GPU"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=driver_version,memory.total,memory.used --format=csv,noheader
    else
        echo "warning: nvidia-smi not found"
    fi
    "$PY" - <<'EOF'
import sys

import torch

import hpsearch

ok = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | CUDA available: {ok}"
      + (f" | {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if ok else "")
      + f" | hpsearch {hpsearch.__version__} from {hpsearch.__file__.rsplit('/', 2)[0]}")
sys.exit(0 if ok else 1)
EOF
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "error: torch cannot use CUDA here (or hpsearch does not import)" >&2
        return 2
    fi
}

run_tests() {
    # The benchmark keeps at least 100 s of the budget (and 10 s for timeout's -k); the
    # tests get the rest.
    local limit=$(( $(left) - 110 ))
    [ "$limit" -lt 60 ] && limit=60
    step "GPU-marked tests: tests/test_gpu.py and -m gpu elsewhere (time limit ${limit}s)"
    rm -f "$OUT_DIR/test_gpu.xml"
    timeout -k 10 "$limit" "$PY" -m pytest -p no:cacheprovider tests/test_gpu.py \
        tests/test_user_step.py -m gpu -v --durations=5 --junitxml="$OUT_DIR/test_gpu.xml"
    TEST_RC=$?
    case "$TEST_RC" in 124|137) echo "error: the tests ran past ${limit}s and were stopped";; esac
}

run_bench() {
    # 10 s for timeout's -k, 10 s for the summary.
    local limit=$(( $(left) - 20 )) mode=()
    rm -rf "$OUT_DIR/bench"
    if [ "$limit" -lt 45 ]; then
        step "benchmark, GPU part: skipped (only ${limit}s left)"
        BENCH_RC=skipped
        return
    elif [ "$limit" -lt 110 ]; then
        mode=(--quick)   # 4 trials of 2 epochs per setting instead of 16 of 10
    fi
    step "benchmark, GPU part: scripts/bench.py --gpu-only ${mode[*]} (time limit ${limit}s)"
    timeout -k 10 "$limit" "$PY" scripts/bench.py --gpu-only "${mode[@]}" --out "$OUT_DIR/bench"
    BENCH_RC=$?
    case "$BENCH_RC" in 124|137) echo "error: the benchmark ran past ${limit}s and was stopped";; esac
}

summary() {
    step "summary"
    "$PY" - "$OUT_DIR" "$TEST_RC" "$BENCH_RC" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, test_rc, bench_rc = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    root = ET.parse(out / "test_gpu.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    print(f"tests: {passed} passed, {n['failures']} failed, {n['errors']} errors, "
          f"{n['skipped']} skipped of {n['tests']} in {float(suite.get('time', 0)):.0f}s "
          f"(pytest exit {test_rc})")
    for case in suite.iter("testcase"):
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0][:160] if el.get("message") else ""
                print(f"  {kind.upper()} {case.get('name')}: {msg}")
except (OSError, ET.ParseError, AttributeError) as err:
    print(f"tests: no result file ({err}); pytest exit {test_rc}")
try:
    doc = json.loads((out / "bench" / "bench.json").read_text())
    gpu = doc.get("gpu", {})
    print(f"bench ({doc.get('mode')}, exit {bench_rc}): {gpu.get('device', gpu)}")
    for key, row in gpu.items():
        if key.startswith("trials_per_device_"):
            print(f"  trials_per_device={key.rsplit('_', 1)[1]}: {row['trials_per_min']} "
                  f"trials/min, {row['seconds']} s, GPU util {row['gpu_util_mean']}%")
    for note in doc.get("notes", []) or []:
        print(f"  note: {note}")
except (OSError, ValueError) as err:
    print(f"bench: no bench.json ({type(err).__name__}); exit {bench_rc}")
EOF
    if command -v nvidia-smi >/dev/null; then
        local apps
        apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory \
               --format=csv,noheader 2>/dev/null)
        [ -n "$apps" ] && echo "warning: processes still on the GPU:" && echo "$apps"
    fi
}

main() {
    TEST_RC=none BENCH_RC=none
    echo "gpu_check: $(date -Is) on $(hostname), output in $OUT_DIR"
    install_wheels || return 2
    header || return 2
    run_tests
    run_bench
    summary
    local status=0
    if [ "$TEST_RC" != 0 ]; then
        echo "gpu_check: tests FAILED (pytest exit $TEST_RC)"
        status=1
    elif [ -f "$OUT_DIR/test_gpu.xml" ] && grep -q '<skipped' "$OUT_DIR/test_gpu.xml"; then
        echo "gpu_check: FAILED: tests were skipped on a CUDA machine"
        status=1
    fi
    if [ "$BENCH_RC" != 0 ] && [ "$BENCH_RC" != skipped ]; then
        echo "gpu_check: benchmark FAILED (exit $BENCH_RC)"
        status=1
    fi
    echo "gpu_check: $([ "$status" -eq 0 ] && echo passed || echo FAILED) in ${SECONDS}s;" \
         "files in $OUT_DIR"
    return "$status"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
