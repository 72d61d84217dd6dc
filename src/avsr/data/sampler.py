"""Frame-budget dynamic bucketing batch sampler (after lhotse's ``DynamicBucketingSampler`` and
auto_avsr's ``max_frames`` batching).

A batch is a budget of video frames, not a count of clips: clips are sorted into ``num_buckets``
length buckets (equal-count quantiles), shuffled within each bucket with a generator seeded from
``(seed, epoch)``, packed greedily so that ``len(batch) * longest clip <= max_frames`` (the padded
size, so the sum of frames is within budget too), and the batches of all buckets are shuffled
together. Every rank computes the same batch list and takes every ``world_size``-th batch, so the
shares are disjoint and equally long (the last ``< world_size`` batches of an epoch are dropped).

A length curriculum (auto_avsr; AV-RelScore trains LRS3 on clips of at most 100, 150, 300, 450
and 600 frames in turn) is a list of ``(max_clip_frames, epochs)`` stages (:func:`clip_limit`).
During a stage, a clip longer than its limit is used only when it can be cut (``cuttable``: word
timings, LRS ``pretrain``), and it then counts as ``max_clip_frames`` long; the dataset cuts it
(:meth:`avsr.data.dataset.AVDataset.__getitem__`). After the last stage the limit is
``max_frames``.

Batches are lists of ``(index, epoch)`` keys: :class:`avsr.data.dataset.AVDataset` seeds each
sample's augmentation from them, which stays correct with persistent DataLoader workers (which
never see a ``set_epoch`` call on their copy of the dataset).
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

SampleKey = tuple[int, int]  # (dataset index, epoch)


def check_curriculum(stages: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """``stages`` (``data.curriculum``) as ``(max_clip_frames, epochs)`` pairs; raises ``ValueError``
    unless each is two positive integers."""
    out = []
    for stage in stages:
        if len(stage) != 2 or min(int(v) for v in stage) <= 0 or any(int(v) != v for v in stage):
            raise ValueError(f"a curriculum stage is [max_clip_frames, epochs], two positive integers; got {list(stage)}")
        out.append((int(stage[0]), int(stage[1])))
    return out


def clip_limit(stages: Sequence[Sequence[int]], epoch: int, default: int) -> int:
    """Longest clip (video frames) of ``epoch`` under the curriculum ``stages`` (``[[max_clip_frames,
    epochs], ...]`` in turn; at most ``default``), and ``default`` after the last stage."""
    start = 0
    for limit, epochs in stages:
        start += epochs
        if epoch < start:
            return min(int(limit), default)
    return default


class FrameBudgetSampler(Sampler[list[SampleKey]]):
    """Batches of dataset indices whose padded size is at most ``max_frames`` video frames.

    Args:
        lengths: video frames of each clip (``ManifestRow.n_frames``), one per dataset index.
        max_frames: frame budget of one batch; a clip longer than this is skipped (logged once).
        num_buckets: number of length buckets (1 = no bucketing).
        max_clips: optional cap on clips per batch (the seed CLI's ``--batch_size``).
        shuffle: shuffle within buckets and the batch order (train); ``False`` keeps length
            order (validation/test).
        seed: base seed; the order of epoch ``e`` depends only on ``(seed, e)``.
        rank, world_size: this process's share under DDP (``0, 1`` for one process).
        curriculum: ``(max_clip_frames, epochs)`` stages (see :func:`clip_limit`; empty disables).
        cuttable: per clip, whether the dataset can cut it to a stage's limit (default: none).
        drop_uneven: drop the last ``len % world_size`` batches so every rank gets the same count
            (needed for DDP training; an evaluation pass can keep them).

    Raises ``ValueError`` for a non-positive budget, bucket count or world size, a rank outside
    ``[0, world_size)``, an empty ``lengths``, a malformed curriculum, or ``cuttable`` of another length.

    Resuming: :meth:`state_dict` takes the number of this epoch's batches the training loop has
    *finished* (DataLoader prefetching runs the iterator ahead of that); after
    :meth:`load_state_dict` the next iteration continues at that batch of that epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_frames: int,
        num_buckets: int = 8,
        max_clips: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        curriculum: Sequence[Sequence[int]] = (),
        cuttable: Optional[Sequence[bool]] = None,
        drop_uneven: bool = True,
    ) -> None:
        if len(lengths) == 0:
            raise ValueError("FrameBudgetSampler: no clips (empty lengths)")
        if max_frames <= 0 or num_buckets <= 0:
            raise ValueError(f"FrameBudgetSampler: max_frames and num_buckets must be positive, got {max_frames}, {num_buckets}")
        if max_clips is not None and max_clips <= 0:
            raise ValueError(f"FrameBudgetSampler: max_clips must be positive, got {max_clips}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"FrameBudgetSampler: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_frames, self.num_buckets, self.max_clips = max_frames, num_buckets, max_clips
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.curriculum = check_curriculum(curriculum)
        self.cuttable = np.zeros(len(self.lengths), bool) if cuttable is None else np.asarray(cuttable, bool)
        if len(self.cuttable) != len(self.lengths):
            raise ValueError(f"FrameBudgetSampler: {len(self.cuttable)} cuttable flags for {len(self.lengths)} clips")
        self.drop_uneven = drop_uneven
        self.epoch = 0
        self._skip = 0  # batches of self.epoch already consumed (set by load_state_dict)
        too_long = int(((self.lengths > max_frames) & ~self.cuttable).sum())
        if too_long:
            log.warning("%d clip(s) longer than max_frames=%d (and without word timings to cut them) are skipped",
                        too_long, max_frames)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (from its first batch)."""
        self.epoch, self._skip = epoch, 0

    def _epoch_lengths(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(eligible indices, every clip's length as used) in ``epoch``: cut clips count as the limit."""
        limit = clip_limit(self.curriculum, epoch, self.max_frames)
        lengths = np.where(self.cuttable, np.minimum(self.lengths, limit), self.lengths)
        return np.flatnonzero(lengths <= limit), lengths

    def _pack(self, indices: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
        batches: list[list[int]] = []
        cur: list[int] = []
        longest = 0
        for i in indices:
            n = int(lengths[i])
            new_longest = max(longest, n)
            full = (len(cur) + 1) * new_longest > self.max_frames or (
                self.max_clips is not None and len(cur) >= self.max_clips)
            if cur and full:
                batches.append(cur)
                cur, new_longest = [], n
            cur.append(int(i))
            longest = new_longest
        if cur:
            batches.append(cur)
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` (dataset indices), before the per-rank split."""
        idx, lengths = self._epoch_lengths(epoch)
        if len(idx) == 0:
            raise ValueError(f"FrameBudgetSampler: no clip fits epoch {epoch}'s length limit")
        rng = np.random.default_rng([self.seed, epoch])
        order = idx[np.argsort(lengths[idx], kind="stable")]
        buckets = np.array_split(order, min(self.num_buckets, len(order)))
        batches: list[list[int]] = []
        for bucket in buckets:
            if self.shuffle:
                bucket = bucket[rng.permutation(len(bucket))]
            batches.extend(self._pack(bucket, lengths))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        batches = self.epoch_batches(epoch)
        if self.drop_uneven:
            usable = len(batches) - len(batches) % self.world_size
            if usable == 0:
                raise ValueError(
                    f"FrameBudgetSampler: epoch {epoch} has {len(batches)} batch(es), fewer than the "
                    f"{self.world_size} ranks; lower data.max_frames or use fewer processes")
            batches = batches[:usable]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, skip = self.epoch, self._skip
        self._skip = 0
        for batch in self._rank_batches(epoch)[skip:]:
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        """Batches the next iteration yields on this rank."""
        return max(0, len(self._rank_batches(self.epoch)) - self._skip)

    def batches_per_epoch(self, epoch: int) -> int:
        """This rank's full batch count in ``epoch`` (for schedules that need a total)."""
        return len(self._rank_batches(epoch))

    def state_dict(self, batches_done: int) -> dict:
        """Position to resume from: ``batches_done`` batches of the current epoch are finished."""
        return {"epoch": self.epoch, "batches_done": int(batches_done), "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at batch ``state['batches_done']`` of epoch ``state['epoch']``.

        Raises ``ValueError`` when the state was written with another seed or world size (the
        batch order would differ, so the run could not continue exactly).
        """
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(
                f"sampler state is for seed {state['seed']} and world size {state['world_size']}, "
                f"this run has seed {self.seed} and world size {self.world_size}: resume with the same settings")
        self.epoch, self._skip = int(state["epoch"]), int(state["batches_done"])
