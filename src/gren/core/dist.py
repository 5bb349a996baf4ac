"""A small distributed helper that also runs in one plain process (CPU or GPU).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_distributed` joins the
process group (NCCL on CUDA, gloo on CPU); otherwise every helper degrades to the single-process
answer, so the training code has one path.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group when launched by ``torchrun`` (env ``WORLD_SIZE`` > 1). Returns whether distributed.

    The CUDA device is set from ``LOCAL_RANK``. Already-initialised groups (tests) are reused.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    log.info("distributed: rank %d of %d (%s)", get_rank(), get_world_size(), backend)
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.length = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.length: (ctx.rank + 1) * ctx.length]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor (n, ...)`` from all ranks along dim 0 (rank order), gradients flowing back.

    The backward sums every rank's gradient for each rank's slice (as ``torch.distributed.nn``'s
    all_gather, which is deprecated). When every rank computes the same loss on the gathered tensor,
    each rank's features thus receive ``world_size x`` the gradient of that loss, and DDP's gradient
    averaging divides it back: the parameters get exactly the gradient of the global loss.
    All ranks must pass the same shape.
    """
    if not is_distributed() or get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor (n, ...)`` from all ranks along dim 0, without gradient (bools travel as uint8)."""
    if not is_distributed() or get_world_size() == 1:
        return tensor
    is_bool = tensor.dtype == torch.bool
    payload = tensor.to(torch.uint8) if is_bool else tensor.detach()
    parts = [torch.empty_like(payload) for _ in range(get_world_size())]
    dist.all_gather(parts, payload.contiguous())
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average a dict of floats over ranks (for logging)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    buf /= get_world_size()
    return dict(zip(keys, buf.tolist()))
