"""P x K sampler: batch shape, epoch coverage, determinism, disjoint ranks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from retrieval.data.sampler import PKSampler


def _labels(sizes: dict[int, int]) -> list[int]:
    """Labels with sizes[c] images of class c, classes interleaved so indices are not grouped by class."""
    labels, left = [], dict(sizes)
    while any(left.values()):
        for c in sorted(left):
            if left[c]:
                labels.append(c)
                left[c] -= 1
    return labels


def _assert_pk(batch: list[int], labels: list[int], p: int, k: int) -> None:
    counts = Counter(labels[i] for i in batch)
    assert len(batch) == p * k and len(counts) == p and set(counts.values()) == {k}


def test_balanced_epoch_covers_every_image_once():
    labels = _labels({c: 8 for c in range(10)})
    sampler = PKSampler(labels, p=4, k=4, seed=1)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 80 // 16
    for batch in batches:
        _assert_pk(batch, labels, 4, 4)
    assert sorted(i for batch in batches for i in batch) == list(range(80))


def test_imbalanced_classes():
    sizes = {0: 1, 1: 2, 2: 3, 3: 5, 4: 9, 5: 20, 6: 4, 7: 4}
    labels = _labels(sizes)
    sampler = PKSampler(labels, p=3, k=4, seed=0)
    kept = [i for i, y in enumerate(labels) if y != 0]  # class 0 has no positive pair
    assert len(sampler) == len(kept) // 12
    seen: set[int] = set()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        for batch in sampler:
            _assert_pk(batch, labels, 3, 4)
            for start in range(0, len(batch), 4):
                group = batch[start : start + 4]
                if sizes[labels[group[0]]] >= 4:
                    assert len(set(group)) == 4  # replacement only where a class is smaller than K
            seen.update(batch)
    assert seen == set(kept)


def test_deterministic_from_seed_and_epoch():
    labels = _labels({c: 7 for c in range(9)})

    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = PKSampler(labels, p=3, k=3, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(5, 0) == epoch_batches(5, 0)
    assert epoch_batches(5, 3) == epoch_batches(5, 3)
    assert epoch_batches(5, 0) != epoch_batches(5, 1)
    assert epoch_batches(5, 0) != epoch_batches(6, 0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_shares_of_the_same_batch_list(world_size):
    labels = _labels({c: 10 for c in range(12)})  # 120 images, P*K = 15: 8 batches cover everything once
    single = PKSampler(labels, p=3, k=5, seed=3, rank=0, world_size=1)
    single.set_epoch(2)
    everything = list(single)
    per_rank = []
    for rank in range(world_size):
        sampler = PKSampler(labels, p=3, k=5, seed=3, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))
        assert len(sampler) == len(per_rank[-1]) == 8 // world_size
    interleaved = [batches[i] for i in range(8 // world_size) for batches in per_rank]
    assert interleaved == everything[: len(interleaved)]
    index_sets = [{i for batch in batches for i in batch} for batches in per_rank]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not index_sets[a] & index_sets[b]


def test_more_ranks_than_batches_still_gives_each_rank_a_batch():
    labels = _labels({0: 2, 1: 2, 2: 2})
    for rank in range(4):
        batches = list(PKSampler(labels, p=2, k=2, rank=rank, world_size=4))
        assert len(batches) == 1
        _assert_pk(batches[0], labels, 2, 2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="P=5 classes per batch, but only 3 classes have at least 2 images"):
        PKSampler(_labels({0: 4, 1: 4, 2: 4, 3: 1}), p=5, k=2)
    with pytest.raises(ValueError, match="rank"):
        PKSampler(_labels({0: 4, 1: 4}), p=2, k=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least 1"):
        PKSampler(_labels({0: 4, 1: 4}), p=2, k=0)


def test_works_as_dataloader_batch_sampler_and_reads_torch_distributed(tmp_path):
    labels = _labels({c: 6 for c in range(5)})
    dataset = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.tensor(labels))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sampler = PKSampler(labels, p=2, k=3)
        assert (sampler.rank, sampler.world_size) == (0, 1)
    finally:
        torch.distributed.destroy_process_group()
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    assert len(loader) == len(sampler) == 30 // 6
    for index, label in loader:
        assert label.tolist() == [labels[i] for i in index.tolist()]
        assert sorted(Counter(label.tolist()).values()) == [3, 3]
