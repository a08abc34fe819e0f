"""The fused LM-head losses under FSDP2 (``fully_shard``) and DDP: two CPU ranks (gloo), each with half of the
global batch, end with the loss and the gradients (trunk and LM head, gathered to full) of one process on the
whole batch.

The losses read ``lm_head.weight`` outside the head's forward, so under FSDP2 it arrives as a ``Shard(0)``
DTensor (``(Replicate(), Shard(0))`` under HSDP): the fused functions all-gather it once per call and
reduce-scatter its gradient, averaged over the ranks like every FSDP / DDP gradient. Token-normalised losses
pass ``num_items_in_batch`` = the global token count / world size (TRL's normaliser), so that the averaged
gradients are those of the global mean.

One ``mp.spawn`` runs every case (process start-up dominates); the tests compare its saved results.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel as DDP

import alignops
from alignops import AlignopsError

WORLD, B, T, H, HT, V = 2, 4, 5, 12, 8, 40  # B sequences (pairs for preference) in the global batch
CASES = [
    ("fsdp", "preference"),
    ("fsdp", "distillation"),
    ("fsdp", "policy"),
    ("fsdp_in_forward", "preference"),
    ("hsdp", "preference"),
    ("ddp", "distillation"),
    ("ddp", "policy"),
]


def _f64(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class TinyLM(torch.nn.Module):
    """A trunk and an LM head. ``forward`` returns hidden states (TRL's pattern with a fused loss) or, given
    ``loss_fn``, the loss computed inside the forward (FSDP's pre-forward hook has gathered the root's params)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.trunk = torch.nn.Linear(H, H, dtype=torch.float64)
        self.head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.trunk.weight.copy_(_f64(H, H, g=g) / H**0.5)
            self.trunk.bias.copy_(_f64(H, g=g) / 4)
            self.head.weight.copy_(_f64(V, H, g=g))

    def forward(self, x, loss_fn=None):
        hidden = torch.tanh(self.trunk(x))
        return hidden if loss_fn is None else loss_fn(hidden, self.head.weight)


def make_batch():
    """The global batch of every family; the per-token masks are uneven across the ranks' halves."""
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    targets[:, :2] = -100
    targets[1, 4] = -100
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0] = True
    mask[3, 1:] = False
    with torch.no_grad():
        probe = TinyLM()
        x_policy = _f64(B, T, H, g=g)
        ids = torch.randint(0, V, (B, T), generator=g)
        logp = torch.log_softmax(probe(x_policy) @ probe.head.weight.T, -1).gather(-1, ids[..., None])[..., 0]
    return {
        "x_pref": _f64(2 * B, T, H, g=g),
        "targets": targets,
        "ref_hidden": _f64(2 * B, T, H, g=g),
        "x_distill": _f64(B, T, H, g=g),
        "teacher_hidden": _f64(B, T, HT, g=g),
        "teacher_weight": _f64(V, HT, g=g),
        "mask": mask,
        "x_policy": x_policy,
        "ids": ids,
        "advantages": _f64(B, g=g),
        "old_logps": logp + 0.15 * _f64(B, T, g=g),  # some ratios inside the clip range, some outside
        "policy_ref_hidden": _f64(B, T, H, g=g),
    }


def rank_rows(rank):
    """This rank's sequences (the first half to rank 0); for preference its chosen rows and rejected rows."""
    per = B // WORLD
    rows = torch.arange(rank * per, (rank + 1) * per)
    return rows, torch.cat([rows, rows + B])


def loss_of(family, model, batch, rows, teacher_weight, world):
    """The family's loss on ``rows``: preference is a per-pair mean (equal pairs per rank: the rank average is
    the global mean); distillation and policy are token means, normalised by the global count / ``world``."""
    seq, pair = rows
    if family == "preference":

        def fn(hidden, weight):
            return alignops.fused_linear_preference_loss(
                hidden, weight, batch["targets"][pair], ref_hidden=batch["ref_hidden"][pair], loss_type="sigmoid"
            ).loss

        return model(batch["x_pref"][pair], fn) if model.in_forward else fn(model(batch["x_pref"][pair]), model.w)
    normaliser = batch["mask"].sum() / world
    if family == "distillation":
        hidden = model(batch["x_distill"][seq])
        return alignops.fused_linear_distillation_loss(
            hidden,
            model.w,
            batch["teacher_hidden"][seq],
            teacher_weight,
            batch["mask"][seq],
            beta=0.5,
            num_items_in_batch=normaliser,
        ).loss
    hidden = model(batch["x_policy"][seq])
    return alignops.fused_linear_policy_loss(
        hidden,
        model.w,
        batch["ids"][seq],
        batch["advantages"][seq],
        batch["mask"][seq],
        old_per_token_logps=batch["old_logps"][seq],
        ref_hidden=batch["policy_ref_hidden"][seq],
        beta=0.04,
        loss_type="dapo",
        num_items_in_batch=normaliser,
    ).loss


class _View:
    """What loss_of needs of a model: call it, and its head's weight as the loss sees it."""

    def __init__(self, model, head, in_forward=False):
        self.model, self.head, self.in_forward = model, head, in_forward

    def __call__(self, *args):
        return self.model(*args)

    @property
    def w(self):
        return self.head.weight


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        batch, rows = make_batch(), rank_rows(rank)
        results = {}
        for scheme, family in CASES:
            model = TinyLM()
            teacher = torch.nn.Linear(HT, V, bias=False, dtype=torch.float64).requires_grad_(False)
            with torch.no_grad():
                teacher.weight.copy_(batch["teacher_weight"])
            if scheme == "ddp":
                wrapped = DDP(model)
                view = _View(wrapped, wrapped.module.head)
            elif scheme == "hsdp":
                # 2 replicas of 1 shard: the head's gradient is averaged over the mesh's replicate dimension
                mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
                fully_shard(model.head, mesh=mesh)
                fully_shard(model, mesh=mesh)
                view = _View(model, model.head)
                assert model.head.weight.placements == (Replicate(), Shard(0))
            else:
                if scheme == "fsdp":
                    fully_shard(model.head)  # its own unit: its weight stays a Shard(0) DTensor outside forward
                    fully_shard(teacher)
                fully_shard(model.trunk)
                fully_shard(model)
                view = _View(model, model.head, in_forward=scheme == "fsdp_in_forward")
                if scheme == "fsdp":
                    assert isinstance(model.head.weight, DTensor) and model.head.weight.placements == (Shard(0),)
            loss = loss_of(family, view, batch, rows, teacher.weight, WORLD)
            loss.backward()
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            grads = {name: _full(p.grad) for name, p in model.named_parameters()}
            results[scheme, family] = {"loss": avg / WORLD, "grads": grads}
        results["collectives"] = count_collectives(batch, rows)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def count_collectives(batch, rows):
    """The collectives of one loss call and its backward, with a sharded head (and teacher): the policy and its
    reference share one all-gather, and one reduce-scatter returns the gradient."""
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    teacher = torch.nn.Linear(HT, V, bias=False, dtype=torch.float64).requires_grad_(False)
    fully_shard(head)
    fully_shard(teacher)

    def no_trunk(x):  # the batch's inputs are the hidden states: no FSDP collective before the loss
        return x.detach().requires_grad_()

    view = _View(no_trunk, head)
    counts = {}
    for family in ("preference", "distillation", "policy"):
        with CommDebugMode() as forward:
            loss = loss_of(family, view, batch, rows, teacher.weight, WORLD)
        with CommDebugMode() as backward:
            loss.backward()
        counts[family] = {
            str(op).split(".")[-1]: n for mode in (forward, backward) for op, n in mode.get_comm_counts().items()
        }
    return counts


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def one_process(family):
    """The loss and gradients of one process on the global batch, with the default (local = global) counts."""
    model, batch = TinyLM(), make_batch()
    rows = (torch.arange(B), torch.arange(2 * B))
    loss = loss_of(family, _View(model, model.head), batch, rows, batch["teacher_weight"], world=1)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(("scheme", "family"), CASES)
def test_sharded_matches_one_process(sharded_runs, scheme, family):
    loss, grads = one_process(family)
    for rank, results in enumerate(sharded_runs):
        got = results[scheme, family]
        torch.testing.assert_close(got["loss"], loss, rtol=1e-12, atol=1e-12, msg=f"rank {rank} loss")
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name  # the comparison below would be vacuous otherwise
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=f"rank {rank} {name}")


@pytest.mark.parametrize(
    ("family", "gathers"), [("preference", 1), ("distillation", 2), ("policy", 1)]
)  # distillation: the student's and the teacher's head
def test_weight_gathered_once_per_call(sharded_runs, family, gathers):
    for results in sharded_runs:
        assert results["collectives"][family] == {"all_gather_into_tensor": gathers, "reduce_scatter_tensor": 1}


@pytest.fixture(scope="module")
def mesh1(tmp_path_factory):
    """A one-rank gloo group in this process, for the DTensor argument checks."""
    init = tmp_path_factory.mktemp("mesh1") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_partial_weight_is_refused(mesh1):
    hidden, targets = torch.randn(3, H, dtype=torch.float64), torch.randint(0, V, (3,))
    weight = DTensor.from_local(torch.randn(V, H, dtype=torch.float64), mesh1, [Partial()])
    with pytest.raises(AlignopsError, match=r"weight is a DTensor with placements \(Partial\(sum\),\).*not a Partial"):
        alignops.fused_linear_logprobs(hidden, weight, targets)
    with pytest.raises(AlignopsError, match=r"student_weight is a DTensor with placements \(Partial\(sum\),\)"):
        alignops.fused_linear_distillation_loss(hidden, weight, hidden, weight.to_local(), torch.ones(3))


def test_dtensor_hidden_is_refused(mesh1):
    weight, targets = torch.randn(V, H, dtype=torch.float64), torch.randint(0, V, (2, 3))
    hidden = distribute_tensor(torch.randn(2, 3, H, dtype=torch.float64), mesh1, [Replicate()])
    with pytest.raises(AlignopsError, match=r"fused_linear_logprobs: hidden is a DTensor with placements \(Replicate"):
        alignops.fused_linear_logprobs(hidden.view(6, H), weight, targets.view(6))
    with pytest.raises(AlignopsError, match=r"fused_linear_policy_loss: hidden is a DTensor .*to_local\(\)"):
        alignops.fused_linear_policy_loss(hidden, weight, targets, torch.zeros(2))


def test_one_rank_dtensor_weight_is_the_plain_weight(mesh1):
    """A sharded weight on one rank is the whole weight: same log-probs and, through the gather's backward,
    the same gradient (as a DTensor of the weight's placement)."""
    hidden, targets = torch.randn(5, H, dtype=torch.float64), torch.randint(0, V, (5,))
    plain = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    sharded = distribute_tensor(plain.detach(), mesh1, [Shard(0)]).requires_grad_()
    want = alignops.fused_linear_logprobs(hidden, plain, targets).logp
    got = alignops.fused_linear_logprobs(hidden, sharded, targets).logp
    assert not isinstance(got, DTensor)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want.sum().backward()
    got.sum().backward()
    assert isinstance(sharded.grad, DTensor) and sharded.grad.placements == (Shard(0),)
    torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad, rtol=0, atol=0)
