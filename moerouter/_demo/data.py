"""The demo's corpus: bytes of the running Python's own standard-library sources (no download)."""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Corpus", "load_corpus"]

VALIDATION_EVERY = 10  # every tenth file is held out, so validation mixes all kinds of module


class Corpus:
    """Train and validation bytes (uint8 tensors): seeded random and fixed validation windows."""

    def __init__(self, train: torch.Tensor, validation: torch.Tensor, files: int) -> None:
        self.train = train
        self.validation = validation
        self.files = files

    def train_batches(
        self, batch_size: int, context: int, seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless random windows (inputs, next-byte targets), the same for every run of a seed."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        offsets = torch.arange(context + 1)
        while True:
            starts = torch.randint(
                0, self.train.numel() - context - 1, (batch_size, 1), generator=generator
            )
            windows = self.train[starts + offsets].long()
            yield windows[:, :-1], windows[:, 1:]

    def validation_batches(
        self, batch_size: int, context: int, num_batches: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Evenly spaced windows over the held-out files: independent of the seed."""
        import torch

        count = batch_size * num_batches
        last_start = self.validation.numel() - context - 1
        if last_start < 1:
            raise ValueError(f"validation corpus too short for context {context}")
        starts = torch.linspace(0, last_start, count).long()[:, None]
        windows = self.validation[starts + torch.arange(context + 1)].long()
        chunks = [windows[start : start + batch_size] for start in range(0, count, batch_size)]
        return [(chunk[:, :-1], chunk[:, 1:]) for chunk in chunks]


def stdlib_sources() -> list[Path]:
    """The top-level ``*.py`` files of the standard library, sorted (present on every CPython)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def load_corpus(max_bytes: int = 4_000_000) -> Corpus:
    """Read standard-library sources in name order until ``max_bytes``; every tenth file validates.

    Raises
    ------
    RuntimeError
        When this Python ships no standard-library sources (some distributions keep only ``.pyc``).
    """
    import torch

    train: list[bytes] = []
    validation: list[bytes] = []
    total = 0
    files = 0
    for index, path in enumerate(stdlib_sources()):
        if total >= max_bytes:
            break
        text = path.read_bytes()
        (validation if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(text)
        total += len(text)
        files += 1
    if not train or not validation:
        raise RuntimeError(
            f"no standard-library sources found under {sysconfig.get_paths()['stdlib']}; "
            "the demo trains on them"
        )

    def as_tensor(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)

    return Corpus(as_tensor(train), as_tensor(validation), files)
