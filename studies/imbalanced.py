"""The user code of ``studies/imbalanced.yaml``: an imbalanced classification task with dict
batches, trained through ``train.step``.

Synthetic card transactions, generated locally: each has ``N_NUMERIC`` numeric features (amount,
hour, distance, ... standardised) and a merchant category, and is ``normal`` (about 85%),
``suspicious`` (about 12%) or ``fraud`` (about 3%). The rare classes depend on the category and
on an interaction of two features, so an embedding and a hidden layer both help. Accuracy
rewards predicting ``normal`` everywhere (about 0.85); macro F1 does not, which is why the
study monitors ``val_f1`` and trains with a class-weighted loss.

Run it from the repository root (so that ``studies.imbalanced`` is importable):
``python -m hpsearch.run studies/imbalanced.yaml``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

N_NUMERIC = 8
N_CATEGORIES = 12
CLASSES = ("normal", "suspicious", "fraud")


class Transactions(Dataset):
    """One split: each item is ``(numeric features, category, label)``."""

    def __init__(self, numeric: np.ndarray, category: np.ndarray, label: np.ndarray) -> None:
        self.numeric = torch.as_tensor(numeric, dtype=torch.float32)
        self.category = torch.as_tensor(category, dtype=torch.long)
        self.label = torch.as_tensor(label, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.numeric[i], self.category[i], self.label[i]


def collate(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
            ) -> dict[str, torch.Tensor]:
    """Items -> one dict batch: ``numeric`` (B, N_NUMERIC), ``category`` (B,), ``label`` (B,)."""
    numeric, category, label = zip(*samples)
    return {"numeric": torch.stack(numeric), "category": torch.stack(category),
            "label": torch.stack(label)}


def transactions(n_samples: int = 6000, seed: int = 0, suspicious: float = 0.12,
                 fraud: float = 0.03) -> dict[str, Any]:
    """The data factory: train / val / test splits (60 / 20 / 20) as torch Datasets, with
    their collate function."""
    rng = np.random.default_rng(seed)
    numeric = rng.standard_normal((n_samples, N_NUMERIC)).astype(np.float32)
    category = rng.integers(0, N_CATEGORIES, n_samples)
    weights = rng.standard_normal(N_NUMERIC) / np.sqrt(N_NUMERIC)
    category_risk = rng.standard_normal(N_CATEGORIES)
    score = (numeric @ weights + category_risk[category]
             + 0.8 * numeric[:, 0] * numeric[:, 1] + 0.3 * rng.standard_normal(n_samples))
    label = np.zeros(n_samples, dtype=np.int64)
    label[score > np.quantile(score, 1 - suspicious - fraud)] = 1
    label[score > np.quantile(score, 1 - fraud)] = 2
    order = rng.permutation(n_samples)
    cuts = (int(0.6 * n_samples), int(0.8 * n_samples))
    parts = np.split(order, cuts)
    splits = {name: Transactions(numeric[idx], category[idx], label[idx])
              for name, idx in zip(("train", "val", "test"), parts)}
    return {**splits, "task": "classification", "input_shape": [N_NUMERIC],
            "output_size": len(CLASSES), "collate_fn": collate}


class TransactionNet(nn.Module):
    """Embeds the category, joins it to the numeric features, and classifies; its forward
    takes the dict batch itself."""

    def __init__(self, n_numeric: int, classes: int, hidden: int, depth: int, embed_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(N_CATEGORIES, embed_dim)
        layers: list[nn.Module] = []
        width = n_numeric + embed_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([batch["numeric"], self.embed(batch["category"])], dim=1)
        return self.head(self.body(x))


def transaction_net(input_shape: list[int], output_size: int, hidden: int = 32, depth: int = 1,
                    embed_dim: int = 4, dropout: float = 0.0) -> TransactionNet:
    """The model factory (``depth: 0`` is a linear model on the features and the embedding)."""
    return TransactionNet(int(input_shape[0]), output_size, hidden, depth, embed_dim, dropout)


def step(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The training step: the model reads the whole dict; the study's ``train.loss`` (class
    weighted) is applied to the outputs and the labels."""
    return {"outputs": model(batch), "targets": batch["label"]}
