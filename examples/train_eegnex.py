#!/usr/bin/env python3
"""Train a small EEGNeX-style network on synthetic 19-channel EEG: a real PyTorch job for
gpuwarden to supervise, with atomic checkpoints, resume on any device, and an optional real GPU
fault (a Triton kernel that stores out of bounds: "CUDA error: an illegal memory access").

    gpuwarden run --checkpoints ckpt/ -- \\
        python examples/train_eegnex.py --device {device} --resume {checkpoint} \\
            --ckpt-dir ckpt --inject-illegal-address-at 17

Not a benchmark or a model of real EEG: the data is made up so the loss visibly falls in a few
dozen steps, on a GPU or a laptop CPU. Needs PyTorch (and Triton for the fault injection only).
"""
import argparse
import math
import os
import sys

import torch
from torch import nn

CHANNELS = 19  # the 10-20 montage, as in the EEGNeX project
SAMPLES = 256  # one second at 256 Hz
RATE_HZ = 256.0
CLASSES = 4


def synthetic_batch(step, batch_size, seed):
    """One batch of synthetic EEG. Class k is a rhythm (6, 10, 18 or 30 Hz) over its own
    spatial pattern, buried in noise, so a model must learn both a temporal and a spatial
    filter. Drawn from (seed, step) alone, so a resumed run sees the same data stream."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    patterns = torch.Generator().manual_seed(seed)  # the same montage patterns every step
    spatial = torch.randn(CLASSES, CHANNELS, generator=patterns)
    spatial = spatial / spatial.norm(dim=1, keepdim=True)
    freqs = torch.tensor([6.0, 10.0, 18.0, 30.0])
    labels = torch.randint(0, CLASSES, (batch_size,), generator=gen)
    t = torch.arange(SAMPLES) / RATE_HZ
    phase = torch.rand(batch_size, 1, generator=gen) * 2 * math.pi
    rhythm = torch.sin(2 * math.pi * freqs[labels].unsqueeze(1) * t + phase)  # (B, T)
    signal = spatial[labels].unsqueeze(2) * rhythm.unsqueeze(1) * 2.0  # (B, C, T)
    noise = torch.randn(batch_size, CHANNELS, SAMPLES, generator=gen)
    return (signal + noise).unsqueeze(1), labels  # (B, 1, C, T): a one-plane "image"


class EEGNeXSmall(nn.Module):
    """EEGNeX's layout at toy size: temporal convolution, a depthwise spatial filter over the
    19 electrodes (the layer that crashed on RDNA cards), a separable (dilated depthwise +
    pointwise) convolution, average pooling, and a linear classifier."""

    def __init__(self, f1=8, depth=2, f2=16, dropout=0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, f1, (1, 33), padding="same", bias=False),  # temporal
            nn.BatchNorm2d(f1),
            nn.Conv2d(f1, f1 * depth, (CHANNELS, 1), groups=f1, bias=False),  # spatial
            nn.BatchNorm2d(f1 * depth),
            nn.ELU(),
            nn.AvgPool2d((1, 4)),
            nn.Dropout(dropout),
            nn.Conv2d(f1 * depth, f1 * depth, (1, 9), padding="same", dilation=(1, 2),
                      groups=f1 * depth, bias=False),  # separable: depthwise ...
            nn.Conv2d(f1 * depth, f2, 1, bias=False),  # ... then pointwise
            nn.BatchNorm2d(f2),
            nn.ELU(),
            nn.AvgPool2d((1, 8)),
            nn.Dropout(dropout),
            nn.Flatten(),
        )
        self.classify = nn.Linear(f2 * (SAMPLES // 32), CLASSES)

    def forward(self, x):
        return self.classify(self.features(x))


def save_atomically(state, ckpt_dir, step):
    """Write the checkpoint under a hidden temp name in the same directory, fsync it, then
    rename it into place: a crash mid-save leaves a stray temp file, never a torn checkpoint."""
    final = os.path.join(ckpt_dir, f"ckpt-step{step:05d}.pt")
    tmp = os.path.join(ckpt_dir, f".ckpt-step{step:05d}.{os.getpid()}.tmp")
    try:
        # Not tempfile.mkstemp: its files are mode 0600; this one gets the umask like any save.
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def far_unmapped_offset(address, offset=16 << 30):
    """An offset (bytes) from `address` of at least 16 GiB, far beyond this job's small GPU
    allocations, that also misses every host mapping of this process: where the driver runs in
    HMM addressing mode a GPU store into host memory would succeed and corrupt it silently."""
    try:
        with open("/proc/self/maps") as maps:
            spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in maps]
    except OSError:
        spans = []
    while any(lo <= address + offset < hi for lo, hi in spans):
        offset *= 2
    return offset


def inject_illegal_address(device):
    """Launch a Triton kernel that stores far past the end of a 4-byte buffer, then
    synchronize: a real GPU page fault (NVIDIA Xid 31 / "Memory access fault by GPU" on
    ROCm), reported by PyTorch as an illegal memory access."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_far(ptr, offset):
        tl.store(ptr + offset, 1.0)

    buf = torch.zeros(1, dtype=torch.float32, device=device)
    offset = far_unmapped_offset(buf.data_ptr()) // buf.element_size()  # in elements
    store_far[(1,)](buf, offset)
    torch.cuda.synchronize(device)
    print("warning: the out-of-bounds store did not fault", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=os.environ.get("GPUWARDEN_DEVICE") or
                   ("cuda" if torch.cuda.is_available() else "cpu"),
                   help="cpu, cuda, cuda:1, ... [default: $GPUWARDEN_DEVICE, else cuda if any]")
    p.add_argument("--resume", metavar="PATH", help="checkpoint to resume from")
    p.add_argument("--ckpt-dir", default="ckpt", help="where checkpoints go [default: ckpt]")
    p.add_argument("--steps", type=int, default=60, help="train until this step [default: 60]")
    p.add_argument("--ckpt-every", type=int, default=5, metavar="N",
                   help="save every N steps [default: 5]")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inject-illegal-address-at", type=int, metavar="STEP",
                   help="at this step, make the GPU fault (ignored on the CPU)")
    args = p.parse_args()

    device = torch.device(args.device)
    inject_at = args.inject_illegal_address_at
    if inject_at is not None and device.type != "cuda":
        print(f"ignoring --inject-illegal-address-at {inject_at}: the fault is a GPU fault and "
              f"this run is on {device}", flush=True)
        inject_at = None

    torch.manual_seed(args.seed)
    model = EEGNeXSmall().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step = 0
    if args.resume:
        # map_location: a checkpoint written on a GPU must load on the CPU tier after a fault.
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = state["step"]
        print(f"resumed from {args.resume} at step {step} (saved on {state['device']}, "
              f"now on {device})", flush=True)
    os.makedirs(args.ckpt_dir, exist_ok=True)

    model.train()
    while step < args.steps:
        step += 1
        x, y = synthetic_batch(step, args.batch_size, args.seed)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == y).float().mean().item()
        print(f"step {step:5d} loss {loss.item():.4f} acc {acc:.3f} device {device}", flush=True)
        if step == inject_at:
            print(f"step {step}: injecting an illegal memory access (Triton store far out of "
                  f"bounds)", flush=True)
            inject_illegal_address(device)
        if step % args.ckpt_every == 0 or step == args.steps:
            path = save_atomically({"step": step, "device": str(device),
                                    "model": model.state_dict(), "optim": opt.state_dict()},
                                   args.ckpt_dir, step)
            print(f"saved {path}", flush=True)
    print(f"done: {step} steps on {device}", flush=True)


if __name__ == "__main__":
    main()
