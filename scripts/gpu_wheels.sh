#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels that the lent GPU machine lacks, so that
# scripts/gpu_check.sh can install them there without a network.
#
# Run it HERE, on a machine with PyPI access; carry `.whl` along with the working tree.
# The GPU machine: x86-64, Python 3.12 (python3), which already has torch (CUDA), numpy,
# joblib, pyyaml, scikit-learn (so scipy and threadpoolctl), pytest (so packaging), jinja2
# (torch's, so MarkupSafe), torchmetrics, tensorboard, rich and hypothesis. Missing there:
# optuna, pydantic, plotly and mnist1d, and the dependencies of theirs listed below.
#
# One pinned version of each wheel, for CPython 3.12 on manylinux x86-64 (pure-python wheels
# too). Stale wheels are wiped first. At the end every wheel's Requires-Dist (extras skipped,
# markers evaluated for that machine) is checked against this set and the packages assumed
# present there, and the total size is printed.
#
# Usage: bash scripts/gpu_wheels.sh        Env: PYTHON (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=.whl

WHEELS=(
    # the project's runtime dependencies that the machine lacks (pyproject.toml)
    optuna==5.0.0                 # optuna>=5.0,<5.1
    pydantic==2.13.4              # pydantic>=2.5
    plotly==7.1.0                 # plotly>=5.0
    mnist1d==0.0.2.post1          # mnist1d>=0.0.2
    # optuna
    alembic==1.20.1
    colorlog==6.12.0
    sqlalchemy==2.1.9             # greenlet only in its asyncio extra
    tqdm==4.70.1
    # alembic
    mako==1.4.3
    # pydantic
    pydantic-core==2.46.4
    annotated-types==0.7.0
    typing-inspection==0.4.2
    typing-extensions==4.15.0     # pydantic needs >=4.14.1; torch's may be older
    # plotly
    narwhals==2.29.0
    # mnist1d imports matplotlib.pyplot and requests at import time
    matplotlib==3.11.2
    contourpy==1.3.3
    cycler==0.12.1
    fonttools==4.68.0
    kiwisolver==1.5.1
    pillow==13.0.0
    pyparsing==3.3.2
    python-dateutil==2.9.0.post0
    six==1.17.0
    requests==2.34.2
    certifi==2026.5.20
    charset-normalizer==3.4.7
    idna==3.13
    urllib3==2.7.0
    # tiny, and nearly always there already (gpu_check.sh skips a wheel whose package the
    # machine has at a version every requirement accepts)
    markupsafe==3.0.3
    packaging==26.2
)
# On the machine already (with their own dependencies); never carried.
PRESENT="torch numpy joblib pyyaml scipy scikit-learn threadpoolctl pytest jinja2"

rm -rf "$DEST"
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
    # (pip's chatter about configured local indexes that do not exist is dropped)
    if ! msg=$("$PY" -m pip download -q --disable-pip-version-check --no-deps \
            --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 \
            -d "$DEST" "$spec" 2>&1); then
        echo "$msg" >&2
        echo "error: cannot download $spec" >&2
        exit 1
    fi
    grep -v "is ignored: it is neither a file nor a directory" <<<"$msg" >&2 || true
done

"$PY" - "$DEST" "$PRESENT" "${WHEELS[@]}" <<'EOF'
"""One wheel per pin, and every runtime requirement met by the set or the machine."""
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

dest, present, pins = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]
# The GPU machine, for environment markers.
env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
wheels = {}
for path in sorted(dest.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(path.name)
    if name in wheels:
        sys.exit(f"error: two wheels of {name}: {wheels[name][0].name}, {path.name}")
    wheels[name] = (path, version)
wanted = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pins}
if set(wanted) != set(wheels):
    sys.exit(f"error: wheels {sorted(wheels)} differ from the pins {sorted(wanted)}")
bad = False
have = set(wheels) | {canonicalize_name(n) for n in present}
for name, (path, version) in sorted(wheels.items()):
    if str(version) != wanted[name]:
        print(f"error: {path.name} is not {name}=={wanted[name]}")
        bad = True
    with zipfile.ZipFile(path) as z:
        meta_name = next(n for n in z.namelist()
                         if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = Parser().parsestr(z.read(meta_name).decode())
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or another platform
        dep = canonicalize_name(req.name)
        if dep not in have:
            print(f"error: {name} needs {req} - neither carried nor on the machine")
            bad = True
        elif dep in wheels and not req.specifier.contains(wheels[dep][1], prereleases=True):
            print(f"error: {name} needs {req}; the carried one is {wheels[dep][1]}")
            bad = True
if bad:
    sys.exit(1)
EOF

ls -1 "$DEST"
echo "$(find "$DEST" -type f -name '*.whl' | wc -l) wheels, total $(du -ch "$DEST"/*.whl | tail -n 1 | cut -f1)" \
     "($(cat "$DEST"/*.whl | wc -c) bytes) in $DEST/"
