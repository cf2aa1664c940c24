"""Run under torchrun by tests/test_multiprocess.py: do the ranks shuffle alike as an epoch starts?

Each rank first draws a different amount from torch's RNG, as dropout does on batches of different
lengths; then, with `--sync`, the train stage's epoch-begin callback runs; then every rank draws a
permutation, as the length-grouped sampler does. Rank 0 prints "same" or "different".
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from transformers import TrainingArguments

from stages.train import make_callbacks

args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to="none")
Accelerator(cpu=True)  # the Trainer makes one; accelerate's RNG sync needs its state
torch.manual_seed(0)
torch.rand(100 + 37 * args.process_index)
if "--sync" in sys.argv:
    for callback in make_callbacks(None, checkpoint_steps=1):
        callback.on_epoch_begin(args, None, None)
permutation = torch.randperm(1000)
gathered = [torch.zeros_like(permutation) for _ in range(args.world_size)]
dist.all_gather(gathered, permutation)
if args.process_index == 0:
    print("same" if all(torch.equal(p, gathered[0]) for p in gathered) else "different")
