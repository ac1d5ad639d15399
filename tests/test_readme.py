"""The README stays true: every study-file key is documented with its default."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from hpsearch.config import PrunerConfig, SamplerConfig, StudyConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Sections documented as a whole (a mapping with free-form keys, or a nested default).
WHOLE = {"study.sampler", "study.pruner", "model.architecture", "train.lr_scheduler",
         "train.early_stopping", "train.loss"}


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = prefix + name
        ann = field.annotation
        subs = [a for a in (ann, *getattr(ann, "__args__", ()))
                if isinstance(a, type) and issubclass(a, BaseModel)]
        if subs and path not in WHOLE and subs[0] not in (SamplerConfig, PrunerConfig):
            out += _keys(subs[0], path + ".")
        else:
            out.append(path)
    return out


def test_every_key_is_in_the_reference_table() -> None:
    reference = README.split("## Study file reference", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `([a-z_.]+)` \|", reference, flags=re.M))
    missing = [k for k in _keys(StudyConfig) if k not in rows]
    assert not missing, f"README lacks rows for {missing}"
    unknown = [r for r in rows if r not in _keys(StudyConfig)]
    assert not unknown, f"README documents keys that do not exist: {unknown}"


def test_readme_commands_exist() -> None:
    assert 'pip install -e ".[dev]" && python -m hpsearch.run studies/mnist1d.yaml' in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    test_command = re.search(r"# 2\. the tests\n(.+)\n", README).group(1).strip()
    assert test_command in ci
