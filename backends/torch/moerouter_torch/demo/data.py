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

    def validation_windows(
        self, windows: int, window_bytes: int, context: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``windows`` disjoint, evenly spaced windows of the held-out bytes, each cut into
        ``window_bytes / context`` sequences: inputs and next-byte targets, both
        ``(windows, window_bytes / context, context)``. Independent of the seed.

        Raises
        ------
        ValueError
            When ``context`` does not divide ``window_bytes`` or the windows do not fit.
        """
        import torch

        if window_bytes % context:
            raise ValueError(
                f"window_bytes ({window_bytes}) must be a multiple of the context ({context})"
            )
        span = window_bytes + 1  # a window's last target is the byte after it
        if windows * span > self.validation.numel():
            raise ValueError(
                f"{windows} windows of {window_bytes} bytes do not fit in the "
                f"{self.validation.numel()} validation bytes"
            )
        starts = torch.linspace(0, self.validation.numel() - span, windows).long()[:, None]
        data = self.validation[starts + torch.arange(span)].long()
        inputs = data[:, :-1].reshape(windows, -1, context)
        targets = data[:, 1:].reshape(windows, -1, context)
        return inputs, targets


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
