"""Invariants of the alignment kernel: every local pair exactly once, padding marked, one expert per
row tile, non-local pairs dropped, and offsets that match the counts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # CI installs triton; test_parity.test_triton_runs_in_ci fails without it


@pytest.fixture(params=["one_program", "spread"])
def path(request, monkeypatch):
    """Both alignment paths: one program (small batches) and count/scan/scatter over the device."""
    import moe.kernels.align as align_mod

    if request.param == "spread":
        monkeypatch.setattr(align_mod, "ONE_PROGRAM_PAIRS", 0)
    return request.param


def _check(ids, num_local, block_m, emap=None):
    from moe.kernels.align import align

    al = align(ids, num_local, block_m, emap)
    flat = ids.reshape(-1).long()
    P = flat.numel()
    local = flat if emap is None else emap.long()[flat]
    total = int(al.total)
    sorted_ids = al.sorted_ids.long()
    assert total % block_m == 0 and total <= sorted_ids.numel()
    real = sorted_ids[sorted_ids < P]
    assert sorted(real.tolist()) == sorted(i for i in range(P) if local[i] >= 0)  # each local pair once
    assert (sorted_ids[total:] == P).all()  # padding past the end is marked
    counts = torch.bincount(local[local >= 0], minlength=num_local)
    ends = al.expert_ends.long()
    for b in range(al.max_blocks):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        e = int(al.block_expert[b])
        if b * block_m >= total:
            assert e == -1
            continue
        members = rows[rows < P]
        assert (local[members] == e).all()  # one expert per tile
        assert b * block_m < int(ends[e]) + block_m  # inside that expert's padded group
    start = ends - counts
    assert (start % block_m == 0).all()


@pytest.mark.parametrize("T,k,E,block_m", [(1, 1, 4, 16), (7, 3, 5, 4), (33, 2, 8, 16), (20, 8, 256, 16), (5, 4, 512, 1),
                                           (300, 4, 8, 16)])  # 1200 pairs: more than one 1024-pair chunk
def test_alignment_invariants(T, k, E, block_m, path):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    _check(ids, E, block_m)


def test_alignment_skewed_and_expert_map(path):
    ids = torch.zeros(9, 2, dtype=torch.int64)  # everything to expert 0 (int64 ids accepted)
    ids[:, 1] = 3
    _check(ids, 4, 4)
    emap = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(11)]).to(torch.int32)
    _check(ids, 3, 4, emap)


def test_host_helpers_match_triton():
    import triton

    from moe.kernels.host import cdiv, next_pow2

    for a in range(0, 300):
        assert next_pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 7, 16, 64, 256):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_pair_rows_inverts_the_sorted_order():
    """Each pair's row in the sorted order; rows holding no pair (num_pairs or past it) land in the last
    entry, and a pair with no row (not local) reads row 0."""
    from moe.kernels.align import pair_rows

    num_pairs = 5  # pair 3 is not local: no sorted row holds it
    sorted_pairs = torch.tensor([4, 0, 2, 5, 1, 7])  # rows 3 and 5 hold no pair (padding)
    rows = pair_rows(sorted_pairs, num_pairs)
    assert rows.dtype == torch.int32 and rows.shape == (num_pairs + 1,)
    assert rows[:num_pairs].tolist() == [1, 4, 2, 0, 0]
    with_rows = pair_rows(sorted_pairs, num_pairs, torch.tensor([10, 11, 12, 13, 14, 15]))
    assert with_rows[:num_pairs].tolist() == [11, 14, 12, 0, 10]
