"""CPU training-step speed of the bundled network under the options that might speed it up.

Prints seconds per optimiser step (forward, loss, backward, Adam) for each variant side by
side in one run, on one random patch of the training size, so the figures share the
machine's load:

- ``fp32``: what ``lobevol train`` does on a CPU;
- ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass;
- ``channels-last``: the model and the batch in ``torch.channels_last_3d``;
- ``bf16+channels-last``: both;
- ``compile``: ``torch.compile(model)`` in fp32 (its first steps compile; they are not timed).

Also prints how far each variant's loss and gradients are from fp32's on the same patch,
since a faster step that learns something else is not a speed-up.

examples:
  .venv/bin/python benchmarks/train_step_cpu.py
  .venv/bin/python benchmarks/train_step_cpu.py --threads 2 --steps 5 --variants fp32,bf16
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from inference.models import build_model  # noqa: E402
from inference.training import TrainConfig, segmentation_loss  # noqa: E402
from inference.vocabulary import NUM_CLASSES  # noqa: E402

VARIANTS = ("fp32", "bf16", "channels-last", "bf16+channels-last", "compile")


def make_model(variant: str, state: dict) -> torch.nn.Module:
    config = TrainConfig()
    model = build_model(config.architecture, config.kernel_size, config.channels)
    model.load_state_dict(state)
    if "channels-last" in variant:
        model = model.to(memory_format=torch.channels_last_3d)
    if variant == "compile":
        model = torch.compile(model)
    return model


def one_step(model, optimizer, images, labels, variant: str) -> tuple[float, list[torch.Tensor]]:
    if "channels-last" in variant:
        images = images.contiguous(memory_format=torch.channels_last_3d)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext())
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        logits = model(images)
    loss = segmentation_loss(logits.float(), labels, 1.0)
    loss.backward()
    gradients = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
    optimizer.step()
    return float(loss.detach()), gradients


def measure(variant: str, state: dict, images, labels, steps: int, warmup: int):
    model = make_model(variant, state)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)   # lr 0: every step sees the same weights
    first = None
    for _ in range(warmup):
        result = one_step(model, optimizer, images, labels, variant)
        first = first or result
    started = time.perf_counter()
    for _ in range(steps):
        result = one_step(model, optimizer, images, labels, variant)
    seconds = (time.perf_counter() - started) / steps
    return seconds, first or result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile: 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TrainConfig()
    state = build_model(config.architecture, config.kernel_size, config.channels).state_dict()
    images = torch.randn(1, 1, *config.patch_size)
    labels = torch.randint(0, NUM_CLASSES, (1, *config.patch_size))
    print(f"patch {config.patch_size}, batch 1, {args.threads} threads, torch {torch.__version__}, "
          f"bf16 fast path: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"{'variant':<20} {'s/step':>8} {'speed-up':>9} {'loss':>9} {'max |grad - fp32| / max |grad|':>32}")
    reference = None
    for variant in variants:
        warmup = max(args.warmup, 3 if variant == "compile" else 0)
        seconds, (loss, gradients) = measure(variant, state, images, labels, args.steps, warmup)
        if reference is None:
            reference = (seconds, gradients)
        scale = max(float(g.abs().max()) for g in reference[1])
        error = max(float((g - r).abs().max()) for g, r in zip(gradients, reference[1])) / scale
        print(f"{variant:<20} {seconds:8.2f} {reference[0] / seconds:8.2f}x {loss:9.4f} {error:32.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
