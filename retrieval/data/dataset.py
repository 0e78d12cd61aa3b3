"""Torch dataset over records: decodes with the shared safe decoder, crops by bbox when present."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from .decode import load_image
from .records import Record


class ImageDataset(torch.utils.data.Dataset):
    """Items are (transform(image), label, index); a bad image raises DecodeError naming its path."""

    def __init__(self, records: Sequence[Record], transform: Callable[[Image.Image], Any], *,
                 draft_size: int | None = None):
        self.records = list(records)
        self.transform = transform
        self.draft_size = draft_size

    @property
    def labels(self) -> list[int]:
        """Label of every item, in order (what PKSampler takes)."""
        return [r.label for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        record = self.records[index]
        decoded = load_image(record.path, draft_size=self.draft_size, bbox=record.bbox)
        return self.transform(decoded.image), record.label, index
