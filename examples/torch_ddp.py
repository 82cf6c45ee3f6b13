"""Data-parallel training with torch DistributedDataParallel across mnp nodes.

Every task of the job is one rank: mnp starts ``tasks_per_node`` of them on
each node with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set (torchrun's names), so the process group comes from
``env://`` and nothing else has to be launched. The backend is NCCL when CUDA
is available (each rank on ``cuda:LOCAL_RANK`` of what ``CUDA_VISIBLE_DEVICES``
shows it), gloo on CPU otherwise.

A small MLP is trained for a few steps on synthetic data drawn from a
generator seeded by the rank, so every rank sees different batches; DDP
averages the gradients, so the weights must stay identical everywhere. Each
rank prints the sum of its final parameters (``%.10e``), rank 0 gathers them
and exits 1 unless all are equal.

    mnp run nodegroups/torch-ddp.toml
    mnp run nodegroups/torch-ddp.toml --param steps=100
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=60.0, help="process group timeout (s)")
    args = ap.parse_args()

    t0 = time.monotonic()
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    node = os.environ.get("MNP_NODE_INDEX", os.environ.get("NODE_RANK", "?"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=args.timeout),
    )

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    target = torch.linspace(-1, 1, 16)
    loss = torch.zeros(())
    for _ in range(args.steps):
        x = torch.randn(args.batch, 16, generator=gen)
        y = (x @ target).unsqueeze(1) + 0.1 * torch.randn(args.batch, 1, generator=gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x.to(device)), y.to(device))
        loss.backward()
        opt.step()

    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    text = f"{checksum:.10e}"
    sys.stdout.write(
        f"rank {rank} of {world} (node {node}, local rank {local}, {device.type}): "
        f"loss {loss.item():.6f} checksum {text}\n"
    )
    sys.stdout.flush()
    gathered: list[object] | None = [None] * world if rank == 0 else None
    dist.gather_object(text, gathered, dst=0)
    dist.destroy_process_group()
    if rank != 0:
        return 0
    assert gathered is not None
    distinct = sorted({str(g) for g in gathered})
    if len(distinct) != 1:
        print(f"ddp FAILED: ranks disagree on the weights: {distinct}", file=sys.stderr)
        return 1
    sys.stdout.write(
        f"ddp ok: {world} ranks, {args.steps} steps, identical weights "
        f"(checksum {distinct[0]}) in {time.monotonic() - t0:.1f}s\n"
    )
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without C++ static destructors: gloo's threads abort ("terminate called
    # without an active exception", exit 134) when rank 0, which hosts the
    # rendezvous store, has already gone while another rank is still shutting down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
