"""UCoFiA's normalisation and the peers' column normalisers on a similarity bank sharded by rows over two
CPU ranks (gloo): every rank's result equals that of one process holding the whole bank."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignops import ot as O

WORLD = 2
SPLIT = (37, 24)  # unequal shards: the statistics must be global, not means of per-rank ones


def make_data():
    g = torch.Generator().manual_seed(4321)
    n = sum(SPLIT)
    return {
        "bank": 3 * torch.randn(2, n, 19, dtype=torch.float64, generator=g),
        "test": 3 * torch.randn(11, 19, dtype=torch.float64, generator=g),
    }


def run_all(data, rows, group):
    bank = data["bank"][:, rows].contiguous()
    out = {}
    for backend in ("native", "torch"):
        norm = O.sinkhorn_normalize(
            bank, n_iters=4, temperature=0.5, chunk_size=8, process_group=group, backend=backend
        )
        out[f"row_{backend}"], out[f"col_{backend}"] = norm.row_bias, norm.col_bias
        kw = dict(temperature=0.3, process_group=group, backend=backend)
        out[f"is_{backend}"] = O.inverted_softmax(data["test"], bank[0], **kw)
        out[f"qb_{backend}"] = O.qb_norm(data["test"], bank[0], k=2, **kw)
        out[f"dsl_{backend}"] = O.dual_softmax(bank[1], **kw)
    out["nnn"] = O.nnn(data["test"], bank[0], k=5, alpha=0.7, chunk_size=6, process_group=group)
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(list(range(WORLD)))
        rows = torch.arange(sum(SPLIT[:rank]), sum(SPLIT[: rank + 1]))
        torch.save(run_all(make_data(), rows, group), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_sharded_bank_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = run_all(make_data(), torch.arange(sum(SPLIT)), None)
    tight = dict(rtol=1e-12, atol=1e-12)
    for r, got in enumerate(ranks):
        rows = slice(sum(SPLIT[:r]), sum(SPLIT[: r + 1]))
        for backend in ("native", "torch"):
            torch.testing.assert_close(got[f"col_{backend}"], single[f"col_{backend}"], **tight)
            torch.testing.assert_close(got[f"row_{backend}"], single[f"row_{backend}"][:, rows], **tight)
            torch.testing.assert_close(got[f"is_{backend}"], single[f"is_{backend}"], **tight)
            torch.testing.assert_close(got[f"qb_{backend}"], single[f"qb_{backend}"], **tight)
            torch.testing.assert_close(got[f"dsl_{backend}"], single[f"dsl_{backend}"][rows], **tight)
        torch.testing.assert_close(got["nnn"], single["nnn"], **tight)
