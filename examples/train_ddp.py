#!/usr/bin/env python3
"""Data-parallel training under torchrun, for gpuwarden to supervise: the EEGNeX-style model of
train_eegnex.py wrapped in DistributedDataParallel, rank 0 writing atomic checkpoints, every
rank resuming from the same one, and an optional real GPU fault in one rank.

    gpuwarden run --checkpoints ckpt/ -- \\
        torchrun --standalone --nproc-per-node 2 examples/train_ddp.py \\
            --device {device} --resume {checkpoint} --ckpt-dir ckpt \\
            --inject-illegal-address-at 12 --inject-rank 1

The process group uses gloo, which works on the CPU and when several ranks share one GPU (NCCL
refuses two ranks on one device); pass --backend nccl with one GPU per rank. Each rank uses
GPU LOCAL_RANK modulo the GPUs it can see.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_eegnex import (  # noqa: E402
    EEGNeXSmall,
    inject_illegal_address,
    save_atomically,
    synthetic_batch,
)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=os.environ.get("GPUWARDEN_DEVICE") or
                   ("cuda" if torch.cuda.is_available() else "cpu"))
    p.add_argument("--resume", metavar="PATH", help="checkpoint to resume from")
    p.add_argument("--ckpt-dir", default="ckpt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ckpt-every", type=int, default=5, metavar="N")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--inject-illegal-address-at", type=int, metavar="STEP")
    p.add_argument("--inject-rank", type=int, default=1, help="the rank that faults")
    args = p.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    print(f"rank {rank}/{world} pid {os.getpid()} pgid {os.getpgrp()} sid {os.getsid(0)} "
          f"on {device}", flush=True)

    torch.manual_seed(args.seed)
    model = EEGNeXSmall().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {args.resume} at step {step} (saved on {state['device']}, "
                  f"now on {device})", flush=True)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    os.makedirs(args.ckpt_dir, exist_ok=True)
    inject_at = args.inject_illegal_address_at if device.type == "cuda" else None

    while step < args.steps:
        step += 1
        # Each rank its own shard of the stream: the seed and the rank pick the batch.
        x, y = synthetic_batch(step, args.batch_size, args.seed * 1000 + rank)
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # all-reduces the gradients: every rank waits for every other
        opt.step()
        if rank == 0:
            print(f"step {step:5d} loss {loss.item():.4f} device {device}", flush=True)
        if step == inject_at and rank == args.inject_rank:
            print(f"rank {rank} step {step}: injecting an illegal memory access", flush=True)
            inject_illegal_address(device)
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
            path = save_atomically({"step": step, "device": str(device),
                                    "model": model.state_dict(), "optim": opt.state_dict()},
                                   args.ckpt_dir, step)
            print(f"saved {path}", flush=True)
    dist.barrier()
    if rank == 0:
        print(f"done: {step} steps on {device}, {world} ranks", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
