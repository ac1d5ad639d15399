"""Built-in datasets, generated locally (never downloaded), and the task each one is.

Each generator returns ``{"x", "y"}`` arrays (and ``x_test``/``y_test`` where the source has
its own test split); :mod:`hpsearch.data` splits and batches them. The study file's
``data.name`` is validated against :data:`DATASETS`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _mnist1d(**args: Any) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    full = get_dataset_args(as_dict=True)
    unknown = set(args) - set(full)
    if unknown:
        raise ValueError(f"unknown MNIST-1D generator argument(s): {sorted(unknown)}")
    full.update(args)
    full.pop("url", None)  # generation is local; the URL is only for downloads
    d = make_dataset(ObjectView(full))
    return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}


def _digits(**args: Any) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    if args:
        raise ValueError(f"the digits dataset takes no arguments (got {sorted(args)})")
    d = load_digits()
    return {"x": (d.data / 16.0).reshape(-1, 1, 8, 8), "y": d.target}


def _synthetic_regression(**args: Any) -> dict[str, np.ndarray]:
    opts = {"n_samples": 2000, "n_features": 20, "n_targets": 1, "noise": 0.1, "seed": 0}
    unknown = set(args) - set(opts)
    if unknown:
        raise ValueError(f"unknown synthetic_regression argument(s): {sorted(unknown)}")
    opts.update(args)
    rng = np.random.default_rng(opts["seed"])
    x = rng.standard_normal((opts["n_samples"], opts["n_features"]))
    w = rng.standard_normal((opts["n_features"], opts["n_targets"]))
    # A mild non-linearity so depth and width matter.
    y = x @ w + 0.5 * np.sin(x[:, :1] * 2.0) + opts["noise"] * rng.standard_normal(
        (opts["n_samples"], opts["n_targets"])
    )
    y = (y - y.mean(0)) / y.std(0)
    return {"x": x, "y": y}


GENERATORS = {
    "mnist1d": _mnist1d,
    "digits": _digits,
    "synthetic_regression": _synthetic_regression,
}
TASKS = {"mnist1d": "classification", "digits": "classification",
         "synthetic_regression": "regression"}
DATASETS = tuple(GENERATORS)
