"""scripts/bench.py --quick runs end to end and writes every key and the table.

No timing is asserted here: the benchmark's targets are checked by reading results/bench/, never
by a test that a busy CI machine could fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TARGET_KEYS = (
    "overhead_ratio",
    "vs_plain_optuna_speedup",
    "scaling_2_workers",
    "pruning_epoch_fraction",
    "pruning_best_gap",
    "checkpoint_overhead_ratio",
    "scale_rate_ratio",
    "search_quality_vs_plain",
    "search_wall_ratio_vs_plain",
    "architecture_ranking_fidelity",
    "epochs_fraction",
)
OTHER_KEYS = (
    "machine",
    "targets",
    "bare_seconds",
    "hpsearch_seconds",
    "plain_optuna_seconds",
    "overhead_breakdown",
    "pruning_per_seed",
    "checkpoint_seconds_per_epoch",
    "scale_disk_bytes",
    "scale_disk_bounded",
    "gpu",
)


@pytest.mark.slow
def test_quick_bench_writes_every_key_and_the_table(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads((out / "bench.json").read_text())
    missing = [k for k in TARGET_KEYS + OTHER_KEYS if k not in doc]
    assert not missing, f"bench.json lacks {missing}"
    for key in TARGET_KEYS:
        assert isinstance(doc[key], (int, float)), (key, doc[key])
        assert doc["targets"][key]["met"] in (True, False)
    for key in ("cpu", "cores", "torch", "optuna", "date"):
        assert doc["machine"][key], key
    assert doc["scale_disk_bounded"] is True
    # On a machine without CUDA the GPU part is skipped with a note, not silently absent.
    assert doc["gpu"]

    readme = (out / "README.md").read_text()
    assert "| metric | value | target | met? |" in readme
    for key in TARGET_KEYS:
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"README table has no row for {key}"
        assert row.count("|") >= 5
    for word in ("cores", "torch", "optuna"):
        assert word in readme
