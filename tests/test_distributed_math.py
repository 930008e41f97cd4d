"""GRPO's dapo aggregation over 2 processes (gloo) equals one process on the same global batch."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from uae_lightning.rl.grpo import aggregate, dapo_num_tokens

# A global rollout batch of 4 sequences x 6 tokens; rank 0 gets sequences 0-1 (11 tokens), rank 1 sequences 2-3 (3):
# unequal token counts are what makes a local normaliser wrong.
LENGTHS = [6, 5, 2, 1]
torch.manual_seed(0)
FEATURES = torch.randn(4, 6, 8)
MASK = torch.tensor([[1] * n + [0] * (6 - n) for n in LENGTHS], dtype=torch.bool)
ADV = torch.tensor([1.0, -0.5, 2.0, -1.5])


def policy() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(8, 1)


def dapo_grad(rows: slice, num_tokens) -> torch.Tensor:
    """Gradient of the dapo loss -A * logit over the rows' completion tokens."""
    model = policy()
    per_token = -model(FEATURES[rows]).squeeze(-1) * ADV[rows, None]
    aggregate(per_token, MASK[rows], "dapo", num_tokens=num_tokens).backward()
    return model.weight.grad.clone()


def _rank(rank: int, init: str, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    rows = slice(2 * rank, 2 * rank + 2)
    grad = dapo_grad(rows, dapo_num_tokens(MASK[rows]))
    dist.all_reduce(grad)  # DDP / FSDP average gradients over ranks
    out[rank] = grad / 2
    local = dapo_grad(rows, float(MASK[rows].sum()))  # the normaliser of this process alone
    dist.all_reduce(local)
    out[2 + rank] = local / 2
    dist.destroy_process_group()


def test_dapo_over_two_ranks_equals_one_process(tmp_path):
    """Tolerance 1e-6 absolute on gradients of size ~0.6 (observed 3e-8: float32 sums in another order); with each
    rank's own token count instead, the gradient differs by 0.64."""
    one = dapo_grad(slice(0, 4), float(MASK.sum()))
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    assert torch.allclose(out[0], one, atol=1e-6) and torch.allclose(out[1], one, atol=1e-6)
    assert (out[2] - one).abs().max() > 0.05  # the per-process normaliser is what this guards against
