"""The DO memory bank (docs/method.md §6): per-class FIFO queues of distracting-object prototypes.

Everything lives in registered buffers, so the bank is saved and restored with the model's
state_dict. Row ``c`` holds class id ``c`` (1..num_classes); row 0 is never a class (0 is
background) and absorbs the entries that are skipped (empty DO masks), so insertion needs
no boolean indexing and no host synchronisation.

Under ``torch.distributed`` the new entries of all ranks are gathered (in global episode
order) before insertion, so every rank holds the same bank, equal to a one-process run's. Negatives are drawn with a counter-based generator: a hash
of (seed, ``sample_step``, class, slot). ``sample_step`` is a buffer that advances
by one per draw on every rank, so the generator state is identical across ranks and is
checkpointed with the bank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

_MASK31 = 0x7FFFFFFF
_NO_SLOT = 1 << 31   # larger than any 31-bit hash: sorts invalid slots last


def _hash31(x: torch.Tensor) -> torch.Tensor:
    """An integer mixing hash on 31-bit values held in int64 (no overflow: products < 2^59)."""
    x = x & _MASK31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK31
    return x ^ (x >> 16)


def _gather_episodes(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's episodes (dim 0), in global batch order; identity outside DDP.

    Training samplers shard a global batch by interleaving (rank r takes episodes r, r+W, ...;
    torch's DistributedSampler and dataset.image's EpisodeSampler), so episode i of rank r is
    global episode i·W + r.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts, dim=1).flatten(0, 1)


class DOMemoryBank(nn.Module):
    """Per-class FIFO of ``capacity`` prototypes of ``channels`` values, for class ids 1..num_classes."""

    def __init__(self, num_classes: int, capacity: int, channels: int, num_negatives: int, seed: int = 0):
        super().__init__()
        if capacity < 1 or num_negatives < 0:
            raise ValueError(f"memory_size must be >= 1 and num_negatives >= 0; got {capacity}, {num_negatives}")
        self.num_classes, self.capacity, self.num_negatives = num_classes, capacity, min(num_negatives, capacity)
        self.seed = seed & _MASK31
        self.register_buffer("prototypes", torch.zeros(num_classes + 1, capacity, channels))
        self.register_buffer("write_pointer", torch.zeros(num_classes + 1, dtype=torch.long))
        self.register_buffer("fill_count", torch.zeros(num_classes + 1, dtype=torch.long))
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("slot_index", torch.arange(capacity), persistent=False)
        # column c of the insertion one-hot counts class c; column 0 (-1) counts nothing: row 0 is the sink
        column_class = torch.arange(num_classes + 1)
        column_class[0] = -1
        self.register_buffer("class_index", column_class, persistent=False)

    @torch.no_grad()
    def sample(self, class_ids: torch.Tensor):
        """Draw up to ``num_negatives`` stored prototypes of each episode's class, without
        replacement. Returns (B×num_negatives×C, valid B×num_negatives)."""
        class_ids = class_ids.long()
        # keyed by (step, class) only, not by the episode's position in the batch: the draw is
        # then the same however the global batch is split across ranks
        class_key = _hash31(_hash31(self.sample_step * 0x9E3779B + self.seed) + class_ids)
        scores = _hash31(class_key[:, None] * 0x5BD1E99 + self.slot_index)            # B×capacity
        stored = self.slot_index < self.fill_count[class_ids][:, None]
        scores = scores.masked_fill(~stored, _NO_SLOT)
        picked_scores, picked = torch.topk(scores, self.num_negatives, dim=1, largest=False)
        self.sample_step += 1
        return self.prototypes[class_ids[:, None], picked], picked_scores < _NO_SLOT

    @torch.no_grad()
    def push(self, prototypes: torch.Tensor, class_ids: torch.Tensor, keep: torch.Tensor) -> None:
        """Insert the DO prototypes of B episodes: ``prototypes`` B×E×C (E per episode, e.g. the
        query and its K supports), ``class_ids`` B, ``keep`` B×E (bool; False = skip).

        Entries go in global episode order, then in order within an episode, so the bank is
        the same whether a global batch runs in one process or across DDP ranks. If a class
        gets more than ``capacity`` entries at once, only the newest survive (FIFO).
        """
        prototypes = _gather_episodes(prototypes.detach().to(self.prototypes.dtype))
        class_ids = _gather_episodes(class_ids.long())
        keep = _gather_episodes(keep.to(torch.uint8)).bool()
        prototypes = prototypes.flatten(0, 1)                               # entries E'×C
        rows = class_ids[:, None].expand_as(keep).masked_fill(~keep, 0).flatten()
        one_hot = (rows[:, None] == self.class_index[None, :]).long()       # E'×(N+1)
        order = one_hot.cumsum(dim=0).gather(1, rows[:, None])[:, 0] - 1   # rank within its class
        added = one_hot.sum(dim=0)                                  # per class
        newest = order >= added[rows] - self.capacity
        rows = rows.masked_fill(~newest, 0)
        slots = (self.write_pointer[rows] + order) % self.capacity
        values = prototypes * (rows > 0)[:, None].to(prototypes.dtype)   # the sink only ever holds zeros
        self.prototypes.index_put_((rows, slots), values)
        self.write_pointer.copy_((self.write_pointer + added) % self.capacity)
        self.fill_count.copy_((self.fill_count + added).clamp_max(self.capacity))
