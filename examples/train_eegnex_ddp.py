#!/usr/bin/env python3
"""The EEGNeX example (train_eegnex.py) as a DistributedDataParallel job under torchrun: one
process per GPU the attempt sees, so gpuwarden can exclude a faulty GPU and keep training on the
others (issue 14).

    gpuwarden run --checkpoints ckpt/ -- \\
        torchrun --standalone --nproc-per-node {nproc} examples/train_eegnex_ddp.py \\
            --device {device} --resume {checkpoint} --ckpt-dir ckpt \\
            --inject-illegal-address-at 17 --inject-rank 1

Rank r trains on the GPU `cuda:LOCAL_RANK` (NCCL/RCCL), or on the CPU (gloo) when gpuwarden's
tier says `cpu`. Every rank sees its own slice of the synthetic stream, rank 0 saves the
checkpoint, and every rank resumes from it, whatever the world size was when it was written.
With --inject-rank R the fault is injected on rank R only, and only while more than one process
runs: after gpuwarden hid that rank's GPU, the run finishes on the GPUs that are left. Not run
on two GPUs yet (see docs/gpu-validation/two-gpu.sh).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_eegnex import (  # noqa: E402  (the single-process example, beside this file)
    EEGNeXSmall,
    inject_illegal_address,
    save_atomically,
    synthetic_batch,
)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=os.environ.get("GPUWARDEN_DEVICE") or "cuda",
                   help="cuda (each rank takes cuda:LOCAL_RANK) or cpu [default: $GPUWARDEN_DEVICE]")
    p.add_argument("--resume", metavar="PATH", help="checkpoint to resume from")
    p.add_argument("--ckpt-dir", default="ckpt")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--ckpt-every", type=int, default=5, metavar="N")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inject-illegal-address-at", type=int, metavar="STEP",
                   help="at this step, make a GPU fault (ignored on the CPU)")
    p.add_argument("--inject-rank", type=int, default=0,
                   help="the rank whose GPU faults; only while the world has more than one rank")
    args = p.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = args.device != "cpu"
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    say = (lambda *a: print(f"[rank{rank}]", *a, flush=True))
    say(f"world {world}, device {device}, GPUWARDEN_GPUS={os.environ.get('GPUWARDEN_GPUS')!r}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, "
        f"ROCR_VISIBLE_DEVICES={os.environ.get('ROCR_VISIBLE_DEVICES')!r}")

    torch.manual_seed(args.seed)
    model = EEGNeXSmall().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = state["step"]
        say(f"resumed from {args.resume} at step {step} (saved by {state.get('world', 1)} "
            f"rank(s) on {state['device']})")
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if on_gpu else None)
    if rank == 0:
        os.makedirs(args.ckpt_dir, exist_ok=True)

    inject_at = args.inject_illegal_address_at if on_gpu and world > 1 else None
    ddp.train()
    while step < args.steps:
        step += 1
        # Each rank its own slice of the stream: (seed, step) drawn per rank.
        x, y = synthetic_batch(step * 1024 + rank, args.batch_size, args.seed)
        x, y = x.to(device), y.to(device)
        logits = ddp(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step:5d} loss {loss.item():.4f} world {world} device {device}",
                  flush=True)
        if step == inject_at and rank == args.inject_rank:
            say(f"step {step}: injecting an illegal memory access on {device}")
            inject_illegal_address(device)
        if step % args.ckpt_every == 0 or step == args.steps:
            if rank == 0:
                path = save_atomically({"step": step, "device": str(device), "world": world,
                                        "model": model.state_dict(),
                                        "optim": opt.state_dict()},
                                       args.ckpt_dir, step)
                print(f"saved {path}", flush=True)
            dist.barrier()
    say(f"done: {step} steps")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
