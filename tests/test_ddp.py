"""Two-process DDP on CPU (gloo): the global inter-image graph's gradient, and the training loop of every method.

The processes are spawned with ``torch.multiprocessing`` and join the group through the same
environment variables ``torchrun`` sets, so :func:`gren.core.dist.init_distributed` takes its
real path.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from gren.core import dist
from gren.methods import graph

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

        # 2. The training loop under DDP, for every registered method (GREN's with the global inter graph): each
        # rank's own model (in memory, not the checkpoint only rank 0 writes) ends with identical parameters, and
        # they moved. (Batch-norm running statistics are not compared: DDP broadcasts rank 0's at each forward,
        # then each rank updates them on its own batch, and only rank 0's are saved.)
        from _train_fakes import FakeLesionDataset, small_config
        from gren.methods import METHODS
        from gren.train import engine

        built = []

        def build_and_keep(*args, **kwargs):
            built.append(engine_build(*args, **kwargs))
            return built[-1]

        engine_build = engine.build_method
        engine.build_method = build_and_keep
        dataset = FakeLesionDataset(n=12, size=48, n_annotated=4)
        for name in sorted(METHODS):
            config = small_config(train={"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 2},
                                  graph={"inter_scope": "global"}, optim={"lr": 0.01}, data={"size": 48},
                                  cam={"channels": 16})
            config["method"] = name
            torch.manual_seed(1000 + rank)  # fit must seed (and broadcast) the weights itself
            history = engine.fit(config, f"{run_dir}/{name}",
                                 engine.TrainingData(dataset, dataset.annotated, dataset.unannotated))
            weights = [p.detach().double() for p in built[-1].parameters()]
            checksum = torch.stack([v.sum() + (v * v).sum() for v in weights]).sum().reshape(1)
            checksums = [torch.zeros(1, dtype=torch.float64) for _ in range(WORLD)]
            torch_dist.all_gather(checksums, checksum)
            assert checksums[0].item() == checksums[1].item(), name
            torch.manual_seed(int(config["seed"]))
            initial = engine_build(config["method"], config)
            assert any(not torch.equal(a, b) for a, b in zip(initial.parameters(), built[-1].parameters())), name
            if rank == 0:
                assert history[-1]["steps"] == 2 and history[-1]["images"] == 2 * 2 * WORLD
                if name == "gren":
                    assert set(history[-1]["loss"]) == {"total", "box", "mil", "intra", "inter"}
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.skipif(not torch_dist.is_available(), reason="torch.distributed not available")
def test_two_process_gloo(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "run")), nprocs=WORLD, join=True)
