"""PK sampling under DDP: each batch holds P identities x K images.

Every rank draws its own identities, and every rank yields the same number of batches per
epoch (a rank that runs out first would leave the others waiting in an all-reduce forever).
Batches are a pure function of (seed, epoch, rank), so a resumed run redraws the same epoch.

Under-sampling (`max_images_per_id`, from a competition write-up on long-tailed data): an
identity with many images contributes at most that many per epoch, a different random subset
every epoch, so frequent identities stop dominating the epoch while all their images are
still seen over the run.

Cross-modal sampling (`modalities`): every identity of a batch brings K / M images of each of
its M modalities, so every anchor has positives (and negatives) in the other modality; an
identity missing a modality is left out of the batches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

_LEFT_OUT = -(2**62)  # the pid of samples cross-modal sampling leaves out


class PKBatchSampler:
    """Batch sampler yielding lists of dataset indices, P identities x K instances each.

    Args:
        pids: identity label of every dataset index.
        num_ids: P, identities per batch.
        num_instances: K, images per identity (drawn with replacement when an identity has
            fewer than K images).
        num_replicas: DDP world size.
        rank: this process's rank.
        seed: base seed; the epoch set with `set_epoch` is mixed in.
        batches_per_epoch: fixed number of batches per rank (0 = the fewest any rank can form
            without reusing an image chunk).
        max_images_per_id: at most this many distinct images of an identity per epoch, drawn
            anew each epoch (0 = all of them); at least K, or each batch would repeat images.
        modalities: modality index of every dataset index: cross-modal PK batches, K split
            evenly across the modalities (K must be a multiple of their count); None = plain.

    Identities are split across ranks each epoch (rank r takes every world-th identity of a
    shuffled list); with fewer than P x world identities every rank draws from all of them
    (and then each rank draws its own `max_images_per_id` subset).
    """

    def __init__(
        self,
        pids: Sequence[int],
        num_ids: int = 16,
        num_instances: int = 4,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        batches_per_epoch: int = 0,
        max_images_per_id: int = 0,
        modalities: Sequence[int] | None = None,
    ):
        if num_ids < 1 or num_instances < 1:
            raise ValueError(f"P={num_ids} and K={num_instances} must both be >= 1")
        # (pid, modality) -> dataset indices; None for plain PK sampling
        self.index_by_modality: dict[int, list[np.ndarray]] | None = None
        if modalities is not None:
            pids = self._cross_modal_groups(pids, modalities, num_instances)
        if max_images_per_id < 0 or 0 < max_images_per_id < num_instances:
            raise ValueError(
                f"data.max_images_per_id={max_images_per_id} must be 0 (off) or at least "
                f"K=data.num_instances={num_instances}"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} must be in [0, {num_replicas})")
        self.index_by_pid: dict[int, np.ndarray] = {}
        groups: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            if pid != _LEFT_OUT:
                groups[int(pid)].append(index)
        self.index_by_pid = {pid: np.asarray(ix) for pid, ix in sorted(groups.items())}
        if len(self.index_by_pid) < num_ids:
            which = " in every modality" if modalities is not None else ""
            raise ValueError(
                f"PK sampling needs at least P={num_ids} identities{which}, the data has "
                f"{len(self.index_by_pid)}; lower data.num_ids_per_batch"
            )
        self.num_ids = num_ids
        self.num_instances = num_instances
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.max_images_per_id = max_images_per_id
        self.epoch = 0
        # The training loop asks len() (for the schedule) and then iterates, every epoch:
        # draw the epoch's batches once. (epoch, batches of every rank)
        self._drawn: tuple[int, list[list[list[int]]]] | None = None

    def _cross_modal_groups(self, pids: Sequence[int], modalities: Sequence[int],
                            k: int) -> list[int]:
        """Fill `index_by_modality`; returns the pids with identities lacking a modality set
        to a sentinel the caller drops (-2**62)."""
        if len(modalities) != len(pids):
            raise ValueError(f"{len(modalities)} modalities for {len(pids)} samples")
        kinds = sorted({int(m) for m in modalities})
        if len(kinds) < 2:
            raise ValueError(
                "data.cross_modal_sampling: the training data has "
                f"{len(kinds)} modality; cross-modal PK batches need two or more"
            )
        if k % len(kinds):
            raise ValueError(
                f"data.cross_modal_sampling: K=data.num_instances={k} must be a multiple of the "
                f"{len(kinds)} modalities (K / {len(kinds)} images of each per identity)"
            )
        groups: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for index, (pid, modality) in enumerate(zip(pids, modalities)):
            groups[int(pid)][int(modality)].append(index)
        self.index_by_modality = {
            pid: [np.asarray(by[m]) for m in kinds]
            for pid, by in groups.items() if all(by.get(m) for m in kinds)
        }
        return [int(p) if int(p) in self.index_by_modality else _LEFT_OUT for p in pids]

    @property
    def batch_size(self) -> int:
        return self.num_ids * self.num_instances

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_batches(self, rng: np.random.Generator, pids: np.ndarray) -> list[list[int]]:
        """All batches one rank can form from its identities, in random order."""
        chunks: dict[int, list[np.ndarray]] = {}
        for pid in pids:
            if self.index_by_modality is None:
                chunks[int(pid)] = self._chunks(rng, self.index_by_pid[int(pid)],
                                                self.num_instances, self.max_images_per_id)
                continue
            per_modality = self.index_by_modality[int(pid)]
            k = self.num_instances // len(per_modality)
            cap = self.max_images_per_id // len(per_modality)
            parts = [self._chunks(rng, ix, k, cap) for ix in per_modality]
            count = max(len(p) for p in parts)  # every image of the largest modality is used
            chunks[int(pid)] = [
                np.concatenate([p[n % len(p)] for p in parts]) for n in range(count)
            ]
        batches: list[list[int]] = []
        available = [pid for pid in chunks if chunks[pid]]
        while len(available) >= self.num_ids:
            chosen = rng.choice(len(available), size=self.num_ids, replace=False)
            batch: list[int] = []
            for position in sorted(chosen):
                pid = available[position]
                batch.extend(int(i) for i in chunks[pid].pop())
            batches.append(batch)
            available = [pid for pid in available if chunks[pid]]
        return batches

    @staticmethod
    def _chunks(rng: np.random.Generator, indices: np.ndarray, k: int,
                cap: int) -> list[np.ndarray]:
        """An identity's images (at most `cap` of them, 0 = all) shuffled into chunks of k."""
        indices = rng.permutation(indices)
        if cap:
            indices = indices[:cap]  # this epoch's random subset
        if len(indices) < k:
            indices = rng.choice(indices, size=k, replace=True)
        elif len(indices) % k:
            # pad to a multiple of K with repeats so every image gets used
            extra = rng.choice(indices, size=k - len(indices) % k, replace=False)
            indices = np.concatenate([indices, extra])
        return list(indices.reshape(-1, k))

    def _all_rank_batches(self) -> list[list[list[int]]]:
        if self._drawn is None or self._drawn[0] != self.epoch:
            self._drawn = (self.epoch, self._draw_all_rank_batches())
        return self._drawn[1]

    def _draw_all_rank_batches(self) -> list[list[list[int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pids = rng.permutation(np.fromiter(self.index_by_pid, dtype=np.int64))
        per_rank = []
        for rank in range(self.num_replicas):
            if len(pids) >= self.num_ids * self.num_replicas:
                mine = pids[rank :: self.num_replicas]
            else:
                mine = pids  # too few identities to split: every rank draws from all
            rank_rng = np.random.default_rng([self.seed, self.epoch, rank])
            per_rank.append(self._rank_batches(rank_rng, mine))
        return per_rank

    def __len__(self) -> int:
        if self.batches_per_epoch > 0:
            return self.batches_per_epoch
        return min(len(b) for b in self._all_rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self._all_rank_batches()
        count = self.batches_per_epoch or min(len(b) for b in per_rank)
        mine = per_rank[self.rank]
        for n in range(count):
            yield mine[n % len(mine)]  # cycle when a fixed count exceeds what the rank formed
