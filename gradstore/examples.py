"""What reads return: one `Example`, or a CSR `Batch` of many."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ._encoding import ExampleId


def _dequantize(rows: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    if scales is not None:
        return rows.to(torch.float32) * scales[:, None]
    return rows.to(torch.float32)


@dataclass(frozen=True)
class Example:
    """One stored example.

    token_ids: int32 [k] (distinct). rows: [k, D], the store's dtype (float32, bfloat16, or int8 with
    `scales` float32 [k]). meta: the metadata dict given at append (with "tokens", the token sequence, if any).
    """

    id: ExampleId
    token_ids: torch.Tensor
    rows: torch.Tensor
    scales: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def dequantized(self) -> torch.Tensor:
        """Rows as float32 [k, D] (int8 rows multiplied by their scales)."""
        return _dequantize(self.rows, self.scales)


@dataclass(frozen=True)
class Batch:
    """Many examples in CSR form, in the order they were asked for.

    ids: list of n IDs. offsets: int64 [n+1]; example e owns rows offsets[e]:offsets[e+1]. token_ids: int32 [R].
    rows: [R, D] in the store's dtype; scales: float32 [R] for int8 stores, else None.
    meta: list of n metadata dicts when asked for (`with_meta=True`), else None.
    """

    ids: list[ExampleId]
    offsets: torch.Tensor
    token_ids: torch.Tensor
    rows: torch.Tensor
    scales: torch.Tensor | None = None
    meta: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    def example(self, i: int) -> Example:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return Example(
            id=self.ids[i],
            token_ids=self.token_ids[lo:hi],
            rows=self.rows[lo:hi],
            scales=None if self.scales is None else self.scales[lo:hi],
            meta={} if self.meta is None else self.meta[i],
        )

    def dequantized(self) -> torch.Tensor:
        """Rows as float32 [R, D]."""
        return _dequantize(self.rows, self.scales)

    def select(self, indices: Sequence[int]) -> Batch:
        """The examples at `indices`, in that order, as a new batch (their rows gathered into one block)."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"select: indices must lie in [0, {len(self)}), got {idx.tolist()}")
        starts, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        # Row r of the new batch comes from row start(e) + (r - offsets[e]) of this one, e its example.
        rows = (torch.arange(int(offsets[-1]), dtype=torch.int64)
                + torch.repeat_interleave(starts - offsets[:-1], lengths))
        return Batch(ids=[self.ids[i] for i in idx.tolist()], offsets=offsets, token_ids=self.token_ids[rows],
                     rows=self.rows[rows], scales=None if self.scales is None else self.scales[rows],
                     meta=None if self.meta is None else [self.meta[i] for i in idx.tolist()])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with its tensors on `device` (IDs and metadata stay Python objects)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, offsets=move(self.offsets), token_ids=move(self.token_ids), rows=move(self.rows),
                       scales=move(self.scales))
