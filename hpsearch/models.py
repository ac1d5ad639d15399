"""Built-in architectures and the factory lookup that rebuilds any model from JSON metadata.

Every builder takes the data's ``input_shape`` (without the batch dimension) and
``output_size`` plus its sampled parameters, so a checkpoint's metadata alone rebuilds it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from hpsearch import user_code


def _flat_size(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


class Linear(nn.Module):
    def __init__(self, input_shape: Sequence[int], output_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(_flat_size(input_shape), output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    def __init__(
        self,
        input_shape: Sequence[int],
        output_size: int,
        hidden: int = 128,
        depth: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = _flat_size(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, output_size))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def _as_sequence(x: torch.Tensor, n_dims: int) -> torch.Tensor:
    """(N, L) -> (N, 1, L); (N, C, L) stays; images (N, C, H, W) -> (N, C, H*W)."""
    if n_dims == 1:
        return x.unsqueeze(1)
    if n_dims == 2:
        return x
    return x.flatten(2)


class CNN1d(nn.Module):
    def __init__(
        self,
        input_shape: Sequence[int],
        output_size: int,
        channels: int = 32,
        kernel_size: int = 5,
        depth: int = 3,
    ) -> None:
        super().__init__()
        self.n_dims = len(input_shape)
        in_ch = 1 if self.n_dims == 1 else int(input_shape[0])
        blocks: list[nn.Module] = []
        for i in range(depth):
            # Stride 2 after the first layer shrinks the sequence while widening the features.
            stride = 1 if i == 0 else 2
            blocks += [
                nn.Conv1d(in_ch, channels, kernel_size, stride=stride, padding=kernel_size // 2),
                nn.ReLU(),
            ]
            in_ch = channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(_as_sequence(x, self.n_dims))
        return self.head(h.mean(dim=2))


class GRU(nn.Module):
    def __init__(
        self, input_shape: Sequence[int], output_size: int, hidden: int = 64, layers: int = 1
    ) -> None:
        super().__init__()
        self.n_dims = len(input_shape)
        features = 1 if self.n_dims == 1 else int(input_shape[0])
        self.gru = nn.GRU(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = _as_sequence(x, self.n_dims).transpose(1, 2)  # (N, L, C)
        _, h = self.gru(seq)
        return self.head(h[-1])


class _ResBlock(nn.Module):
    def __init__(self, conv: type[nn.Module], norm: type[nn.Module], ch: int, k: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(ch, ch, k, padding=k // 2, bias=False),
            norm(ch),
            nn.ReLU(),
            conv(ch, ch, k, padding=k // 2, bias=False),
            norm(ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResNetSmall(nn.Module):
    """A small residual CNN: 2-D for images (C, H, W), 1-D for sequences."""

    def __init__(
        self,
        input_shape: Sequence[int],
        output_size: int,
        channels: int = 16,
        blocks: int = 2,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.n_dims = len(input_shape)
        two_d = self.n_dims == 3
        conv = nn.Conv2d if two_d else nn.Conv1d
        norm = nn.BatchNorm2d if two_d else nn.BatchNorm1d
        in_ch = 1 if self.n_dims == 1 else int(input_shape[0])
        self.stem = nn.Sequential(
            conv(in_ch, channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm(channels),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            *[_ResBlock(conv, norm, channels, kernel_size) for _ in range(blocks)]
        )
        self.head = nn.Linear(channels, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_dims == 1:
            x = x.unsqueeze(1)
        h = self.blocks(self.stem(x))
        return self.head(h.flatten(2).mean(dim=2))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "linear": Linear,
    "mlp": MLP,
    "cnn1d": CNN1d,
    "gru": GRU,
    "resnet_small": ResNetSmall,
}


def build_model(
    architecture: str,
    params: dict[str, Any],
    input_shape: Sequence[int],
    output_size: int,
    factory: str | None = None,
) -> nn.Module:
    """Build a model from JSON-safe metadata.

    Args:
        architecture: A built-in name, or any label when ``factory`` is given.
        params: The architecture's sampled parameters, passed as keyword arguments.
        input_shape: One sample's shape.
        output_size: Number of classes, or regression targets.
        factory: ``"package.module:function"`` called as
            ``fn(input_shape=..., output_size=..., **params)``.

    Raises:
        ValueError: Unknown architecture, or parameters the builder does not take.
    """
    fn = user_code.resolve(factory) if factory else ARCHITECTURES.get(architecture)
    if fn is None:
        raise ValueError(f"unknown architecture {architecture!r}")
    sig = inspect.signature(fn)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in params if k not in sig.parameters and not takes_any]
    if unknown:
        raise ValueError(f"architecture {architecture!r} takes no parameter(s) {unknown}")
    model = fn(input_shape=tuple(input_shape), output_size=output_size, **params)
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory {factory!r} returned {type(model).__name__}, not nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
