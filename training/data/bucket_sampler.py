"""Batches drawn one bucket at a time (torch's Sampler): the bucket geometry itself is in buckets.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from training.data.buckets import Bucket


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of dataset indices in which every index shares one bucket.

    Each epoch (each ``iter``) shuffles the indices within each bucket, cuts them into batches
    of ``batch_size`` and shuffles the order of all batches, all from ``generator``: the same
    seed gives the same batches, and successive epochs differ.

    ``drop_last`` drops a bucket's incomplete last batch only when that bucket also filled at
    least one whole batch; a bucket with fewer items than ``batch_size`` always yields one smaller
    batch, otherwise a tiny dataset (or a rare aspect ratio) would never be trained on.
    """

    def __init__(
        self,
        sample_buckets: Sequence[Bucket],
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = generator
        groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(sample_buckets):
            groups.setdefault(tuple(bucket), []).append(index)
        self.groups = dict(sorted(groups.items()))  # fixed order: shuffles depend on the seed only

    def _sizes(self, count: int) -> int:
        full, rest = divmod(count, self.batch_size)
        return full + (1 if rest and (full == 0 or not self.drop_last) else 0)

    def __len__(self) -> int:
        return sum(self._sizes(len(indices)) for indices in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        batches: list[list[int]] = []
        for indices in self.groups.values():
            order = torch.randperm(len(indices), generator=self.generator).tolist()
            shuffled = [indices[i] for i in order]
            chunks = [shuffled[i : i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
            batches += chunks[: self._sizes(len(indices))]
        for position in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[position]
