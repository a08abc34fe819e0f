"""KTO's KL estimate and BCO's running reward shift under torch.distributed: two CPU ranks (gloo) each
holding half the batch give the loss and gradients of one process holding all of it."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import alignops.objectives as obj

WORLD = 2
B = 6  # per rank: equal local batches, as DDP averages the ranks' gradients
KL_SPLIT = (5, 2)  # unequal KL completions per rank: the estimate must be the global mean, not a mean of means
STEPS = 2  # BCO: the running mean must merge every rank's rewards at every step


def make_data():
    g = torch.Generator().manual_seed(1234)
    n = WORLD * B
    return {
        "policy": -60 + 10 * torch.randn(n, dtype=torch.float64, generator=g),
        "ref": -60 + 10 * torch.randn(n, dtype=torch.float64, generator=g),
        "desirable": torch.rand(n, generator=g) < 0.5,
        "kl_policy": -50 + 5 * torch.randn(sum(KL_SPLIT), dtype=torch.float64, generator=g),
        "kl_ref": -52 + 5 * torch.randn(sum(KL_SPLIT), dtype=torch.float64, generator=g),
        "steps": [torch.randn(n, dtype=torch.float64, generator=g) for _ in range(STEPS)],
    }


def run_objectives(data, rows, kl_rows, process_group):
    """KTO then BCO on the given rows; returns losses, gradients and the statistics they used."""
    out = {}
    policy = data["policy"][rows].clone().requires_grad_(True)
    kto = obj.kto_loss(
        policy,
        data["ref"][rows],
        data["desirable"][rows],
        beta=0.3,
        desirable_weight=1.2,
        policy_kl_logps=data["kl_policy"][kl_rows],
        ref_kl_logps=data["kl_ref"][kl_rows],
        process_group=process_group,
    )
    kto.loss.backward()
    out["kto_loss"], out["kto_grad"], out["kl"] = kto.loss.detach(), policy.grad.clone(), kto.kl

    running = obj.RunningMoments()
    for step, noise in enumerate(data["steps"]):
        policy = (data["policy"][rows] + noise[rows]).requires_grad_(True)
        bco = obj.bco_loss(
            policy, data["ref"][rows], data["desirable"][rows], beta=0.2, running=running, process_group=process_group
        )
        bco.loss.backward()
        out[f"bco_loss{step}"], out[f"bco_grad{step}"], out[f"delta{step}"] = bco.loss.detach(), policy.grad, bco.delta
    out["running"] = running.state_dict()
    return out


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(list(range(WORLD)))
        data = make_data()
        rows = torch.arange(rank * B, (rank + 1) * B)
        kl_rows = torch.arange(sum(KL_SPLIT[:rank]), sum(KL_SPLIT[: rank + 1]))
        torch.save(run_objectives(data, rows, kl_rows, group), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_kto_and_bco_across_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    data = make_data()
    single = run_objectives(data, torch.arange(WORLD * B), torch.arange(sum(KL_SPLIT)), None)
    # the KL estimate of one process on every KL completion (> 0 here, so the clamp is not what matches)
    assert float(single["kl"]) > 0
    tight = dict(rtol=1e-12, atol=1e-12)
    for r, got in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(got["kl"], single["kl"], **tight)
        # each rank's mean over B samples; DDP averages the ranks: d(mean of WORLD*B)/dx = grad / WORLD
        torch.testing.assert_close(got["kto_grad"] / WORLD, single["kto_grad"][rows], **tight)
        for step in range(STEPS):
            torch.testing.assert_close(got[f"delta{step}"], single[f"delta{step}"], **tight)
            torch.testing.assert_close(got[f"bco_grad{step}"] / WORLD, single[f"bco_grad{step}"][rows], **tight)
        assert got["running"] == pytest.approx(single["running"], rel=1e-12, abs=1e-12)
    torch.testing.assert_close(sum(g["kto_loss"] for g in ranks) / WORLD, single["kto_loss"], **tight)
    for step in range(STEPS):
        torch.testing.assert_close(sum(g[f"bco_loss{step}"] for g in ranks) / WORLD, single[f"bco_loss{step}"], **tight)
    # a mean of the per-rank KL means (what gathering per-rank means gives) would differ here
    kl = data["kl_policy"] - data["kl_ref"]
    mean_of_means = (kl[: KL_SPLIT[0]].mean() + kl[KL_SPLIT[0] :].mean()) / 2
    assert abs(float(mean_of_means) - float(single["kl"])) > 1e-3
