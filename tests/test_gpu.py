"""GPU checks: run by scripts/gpu_check.sh on a machine with CUDA; skipped elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from studyfiles import open_results, tiny, write_study

import hpsearch
from hpsearch.config import ResourcesSection
from hpsearch.workers import plan_slots

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_slots_pin_explicit_devices() -> None:
    slots = plan_slots(ResourcesSection(devices="auto", trials_per_device=2))
    n = torch.cuda.device_count()
    assert [s.device for s in slots] == [f"cuda:{i}" for i in range(n) for _ in range(2)]


def test_run_on_gpu_with_two_trials_per_device(tmp_path: Path) -> None:
    raw = tiny(study={"n_trials": 6}, resources={"devices": ["cuda:0"], "trials_per_device": 2,
                                                 "workers": "auto"})
    study_file = write_study(tmp_path, raw)
    out = subprocess.run(
        [sys.executable, "-m", "hpsearch.run", str(study_file), "--results-dir", "res"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    trials = open_results(tmp_path / "res/tiny").get_trials()
    assert len(trials) == 6
    assert {t.user_attrs["device"] for t in trials} == {"cuda:0"}
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    model = hpsearch.load_best_model(tmp_path / "res/tiny", map_location="cuda:0")
    assert next(model.parameters()).device.type == "cuda"
    cpu = hpsearch.load_best_model(tmp_path / "res/tiny", map_location="cpu")
    assert next(cpu.parameters()).device.type == "cpu"
