"""fused_linear_preference_loss under DistributedDataParallel: two CPU ranks (gloo), each with half of the
pairs, end with the same loss (averaged over ranks) and the same gradients as one process on all pairs.
The op's backward is a plain autograd node, so DDP's gradient hooks fire as for any module."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import alignops

WORLD, PAIRS_PER_RANK, T, H, V = 2, 2, 7, 12, 40


class TinyPolicy(torch.nn.Module):
    """A trunk and an LM head; the loss is computed from the trunk's hidden states and the head's weight."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = torch.nn.Linear(H, H, dtype=torch.float64)
        self.head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.trunk.weight.copy_(torch.randn(H, H, generator=g, dtype=torch.float64) / H**0.5)
            self.trunk.bias.zero_()
            self.head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))

    def forward(self, x, targets, ref_hidden):
        h = torch.tanh(self.trunk(x))
        return alignops.fused_linear_preference_loss(
            h, self.head.weight, targets, ref_hidden=ref_hidden, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1]
        ).loss


def make_batch():
    g = torch.Generator().manual_seed(1)
    B = WORLD * PAIRS_PER_RANK
    x = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    targets[:, :2] = -100
    ref_hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    return x, targets, ref_hidden


def rank_rows(rank):
    """This rank's pairs in the [chosen; rejected] layout: its chosen rows and its rejected rows."""
    B = WORLD * PAIRS_PER_RANK
    chosen = torch.arange(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK)
    return torch.cat([chosen, chosen + B])


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = DDP(TinyPolicy())
        x, targets, ref_hidden = make_batch()
        rows = rank_rows(rank)
        loss = model(x[rows], targets[rows], ref_hidden[rows])
        loss.backward()
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        torch.save(
            {"loss": avg / WORLD, "grads": {n: p.grad for n, p in model.module.named_parameters()}},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model = TinyPolicy()
    x, targets, ref_hidden = make_batch()
    loss = model(x, targets, ref_hidden)
    loss.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-10, atol=1e-12)
