"""Two-process DDP on CPU (gloo): the global inter-image graph's gradient, and the training loop.

The processes are spawned with ``torch.multiprocessing`` and join the group through the same
environment variables ``torchrun`` sets, so :func:`gren.train.dist.init_distributed` takes its
real path.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from gren.methods import graph
from gren.train import dist

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_inter_loss(model: torch.nn.Module, inputs: torch.Tensor, hashes: torch.Tensor, gather: bool):
    vectors = torch.nn.functional.normalize(model(inputs), dim=-1)
    valid = torch.ones(len(inputs), dtype=torch.bool)
    if gather:
        vectors, hashes, valid = (dist.all_gather_with_grad(vectors), dist.all_gather_no_grad(hashes),
                                  dist.all_gather_no_grad(valid))
    return graph.InterImageRegularizer("pull")(vectors, graph.hash_inter_dissimilarity(hashes), valid)


def _worker(rank: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert dist.init_distributed(backend="gloo") and dist.get_world_size() == WORLD
    try:
        # 1. The all-gathered inter graph gives DDP exactly the single-process gradient on the whole batch.
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(2 * WORLD, 6, generator=generator)
        hashes = torch.rand(2 * WORLD, 2, 64, generator=generator) > 0.5
        torch.manual_seed(0)
        reference = torch.nn.Linear(6, 5)
        _global_inter_loss(reference, inputs, hashes, gather=False).backward()
        torch.manual_seed(0)
        local = torch.nn.Linear(6, 5)
        ddp = torch.nn.parallel.DistributedDataParallel(local)
        mine = slice(2 * rank, 2 * rank + 2)
        loss = _global_inter_loss(ddp, inputs[mine], hashes[mine], gather=True)
        loss.backward()
        torch.testing.assert_close(local.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(local.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-7)

        # 2. The training loop under DDP with the global inter graph: ranks end with identical weights.
        from _train_fakes import FakeLesionDataset, small_config
        from gren.train.engine import TrainingData, fit

        dataset = FakeLesionDataset(n=12, size=48, n_annotated=4)
        config = small_config(train={"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 2},
                              graph={"inter_scope": "global"}, optim={"lr": 0.01}, data={"size": 48})
        config["method"] = "gren"
        history = fit(config, run_dir, TrainingData(dataset, dataset.annotated, dataset.unannotated))
        from gren.train.checkpoint import load_checkpoint

        torch_dist.barrier()
        weights = load_checkpoint(os.path.join(run_dir, "checkpoints", "last.pt"))["model"]
        checksum = torch.stack([v.double().sum() for v in weights.values() if v.is_floating_point()]).sum()
        from gren.methods.registry import build_method  # noqa: F401  (registry importable in the child)

        checksums = [torch.zeros(1, dtype=torch.float64) for _ in range(WORLD)]
        torch_dist.all_gather(checksums, checksum.reshape(1))
        assert checksums[0].item() == checksums[1].item()
        if rank == 0:
            assert history[-1]["steps"] == 2 and history[-1]["images"] == 2 * 2 * WORLD
            assert set(history[-1]["loss"]) == {"total", "box", "mil", "intra", "inter"}
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.skipif(not torch_dist.is_available(), reason="torch.distributed not available")
def test_two_process_gloo(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "run")), nprocs=WORLD, join=True)
