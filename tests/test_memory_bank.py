"""The DO memory bank: FIFO per class, sampling, state_dict round trip, DDP gathering."""
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.memory_bank import DOMemoryBank


def entries(values, channels=2):
    """Prototypes whose first channel is the given value (easy to read back)."""
    out = torch.zeros(len(values), channels)
    out[:, 0] = torch.tensor(values, dtype=torch.float32)
    return out


def push(bank, values, classes, keep=None):
    """One entry per episode."""
    keep = torch.ones(len(values), dtype=torch.bool) if keep is None else torch.tensor(keep)
    bank.push(entries(values, bank.prototypes.shape[-1])[:, None], torch.tensor(classes), keep[:, None])


def stored_values(bank, class_id):
    """First feature of each prototype of ``class_id`` in insertion order, oldest first."""
    count = int(bank.fill_count[class_id])
    start = int(bank.write_pointer[class_id]) - count
    slots = [(start + i) % bank.capacity for i in range(count)]
    return bank.prototypes[class_id, slots][:, 0].tolist()


def test_fifo_keeps_the_newest_capacity_entries_in_order():
    bank = DOMemoryBank(num_classes=3, capacity=3, channels=2, num_negatives=2)
    push(bank, [1, 2], [2, 2])
    assert stored_values(bank, 2) == [1, 2]
    push(bank, [3, 4, 5], [2, 2, 2])
    assert stored_values(bank, 2) == [3, 4, 5]
    assert bank.fill_count.tolist() == [0, 0, 3, 0]
    assert bank.write_pointer[2].item() == 5 % 3
    # more than the capacity at once: only the newest survive
    push(bank, [6, 7, 8, 9], [2, 2, 2, 2])
    assert stored_values(bank, 2) == [7, 8, 9]


def test_classes_are_kept_apart_and_skipped_entries_go_nowhere():
    bank = DOMemoryBank(num_classes=3, capacity=4, channels=2, num_negatives=2)
    push(bank, [1, 2, 3, 4, 5], [1, 3, 1, 3, 1], keep=[True, True, False, True, True])
    assert stored_values(bank, 1) == [1, 5]
    assert stored_values(bank, 3) == [2, 4]
    assert stored_values(bank, 2) == []
    assert torch.equal(bank.prototypes[0], torch.zeros(4, 2))      # the sink row holds nothing
    assert bank.fill_count.tolist() == [0, 2, 0, 2]


def test_sampling_draws_only_stored_entries_of_the_episode_class_without_replacement():
    bank = DOMemoryBank(num_classes=3, capacity=8, channels=2, num_negatives=4)
    push(bank, [10, 11, 12, 13, 14, 15], [1, 1, 1, 1, 1, 1])
    push(bank, [20, 21], [2, 2])
    negatives, valid = bank.sample(torch.tensor([1, 2, 3]))
    assert negatives.shape == (3, 4, 2) and valid.shape == (3, 4)
    assert valid.sum(dim=1).tolist() == [4, 2, 0]                 # min(stored, num_negatives)
    first = negatives[0][valid[0]][:, 0].tolist()
    assert len(set(first)) == 4 and set(first) <= {10, 11, 12, 13, 14, 15}
    assert sorted(negatives[1][valid[1]][:, 0].tolist()) == [20, 21]
    assert bank.sample_step.item() == 1


def test_sampling_is_a_function_of_the_bank_state():
    a = DOMemoryBank(num_classes=2, capacity=50, channels=2, num_negatives=10, seed=7)
    push(a, list(range(50)), [1] * 50)
    b = DOMemoryBank(num_classes=2, capacity=50, channels=2, num_negatives=10, seed=7)
    b.load_state_dict(a.state_dict())
    draws_a = [a.sample(torch.tensor([1, 1]))[0][..., 0] for _ in range(3)]
    draws_b = [b.sample(torch.tensor([1, 1]))[0][..., 0] for _ in range(3)]
    for x, y in zip(draws_a, draws_b):
        assert torch.equal(x, y)
    # successive draws differ; two episodes of one class in one draw share it (split-invariant)
    assert not torch.equal(draws_a[0], draws_a[1])
    assert torch.equal(draws_a[0][0], draws_a[0][1])


def test_empty_bank_gives_no_valid_negative():
    bank = DOMemoryBank(num_classes=20, capacity=5, channels=3, num_negatives=3)
    _, valid = bank.sample(torch.tensor([4, 20]))
    assert not valid.any()


def test_state_dict_round_trip():
    bank = DOMemoryBank(num_classes=3, capacity=3, channels=2, num_negatives=2)
    push(bank, [1, 2, 3, 4], [1, 2, 1, 1])
    bank.sample(torch.tensor([1]))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = DOMemoryBank(num_classes=3, capacity=3, channels=2, num_negatives=2)
    restored.load_state_dict(torch.load(buffer))
    assert set(bank.state_dict()) == {"prototypes", "write_pointer", "fill_count", "sample_step"}
    for key, value in bank.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    assert stored_values(restored, 1) == [1, 3, 4]
    push(restored, [5], [1])
    assert stored_values(restored, 1) == [3, 4, 5]


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bank = DOMemoryBank(num_classes=4, capacity=8, channels=2, num_negatives=3)
    # rank r holds global episodes r and r + 2 (interleaved sharding), two entries each
    first, second = 10 * rank + 1, 10 * rank + 2
    prototypes = torch.stack([entries([first, first + 100]), entries([second, second + 100])])
    keep = torch.tensor([[True, rank == 0], [True, True]])
    bank.push(prototypes, torch.tensor([2, 3]), keep)
    torch.save(bank.state_dict(), os.path.join(out_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def test_distributed_push_gathers_every_rank_in_global_episode_order(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pth") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    bank = DOMemoryBank(num_classes=4, capacity=8, channels=2, num_negatives=3)
    bank.load_state_dict(states[0])
    # global episodes: 0 = rank 0's first (class 2), 1 = rank 1's first (class 2, its second entry
    # skipped), 2 = rank 0's second (class 3), 3 = rank 1's second (class 3)
    assert stored_values(bank, 2) == [1, 101, 11]
    assert stored_values(bank, 3) == [2, 102, 12, 112]
    # the same episodes pushed by one process give the same bank
    single = DOMemoryBank(num_classes=4, capacity=8, channels=2, num_negatives=3)
    prototypes = torch.stack([entries([v, v + 100]) for v in (1, 11, 2, 12)])
    keep = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    single.push(prototypes, torch.tensor([2, 2, 3, 3]), keep)
    for key, value in single.state_dict().items():
        assert torch.equal(value, states[0][key]), key


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="memory_size"):
        DOMemoryBank(num_classes=2, capacity=0, channels=2, num_negatives=1)
