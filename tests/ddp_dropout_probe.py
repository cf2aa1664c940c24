"""Run under torchrun by tests/test_multiprocess.py: the train stage's OwnDropoutPerRank callback
under DDP.

Each rank draws as dropout and then as the length-grouped sampler would, after the callback's step
and epoch hooks ran. Rank 0 prints two words: whether the ranks' dropout draws were the same, and
whether their shuffles were the same ("different same" is what training needs).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import TrainingArguments

from stages.train_callbacks import OwnDropoutPerRank


def same_on_every_rank(values: torch.Tensor, world_size: int) -> bool:
    gathered = [torch.zeros_like(values) for _ in range(world_size)]
    dist.all_gather(gathered, values)
    return all(torch.equal(v, gathered[0]) for v in gathered)


args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, report_to="none", seed=42)
callback = OwnDropoutPerRank()
torch.manual_seed(args.seed)  # what the Trainer does on every rank
state = SimpleNamespace(epoch=1.0, global_step=10)
callback.on_step_begin(args, state, None)
mask = torch.nn.functional.dropout(torch.ones(16, 40), 0.1)
torch.rand(50 + 13 * args.process_index)  # ranks' batches differ in length
callback.on_epoch_begin(args, state, None)
shuffle = torch.randperm(1000)
words = [
    "same" if same_on_every_rank(mask, args.world_size) else "different",
    "same" if same_on_every_rank(shuffle, args.world_size) else "different",
]
if args.process_index == 0:
    print(*words)
