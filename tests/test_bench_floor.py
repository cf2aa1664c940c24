"""bench.bench_floor counts what the PyTorch stages compute: its matrix-product FLOPs against
PyTorch's own FLOP counter, and its dropout-mask elements against the `bernoulli_` calls a
training forward makes, on a tiny random BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_floor import Shapes, bert_shapes, mask_cost

TOKENS = 23  # one text of this many word pieces
LORA_RANK, LORA_DROPOUT = 4, 0.1
ALL_TARGETS = ["query", "key", "value", "dense"]  # the project's table for BERT
# Others that change which gradients layer 0 computes (PEFT's default for BERT is query, value).
TARGET_SETS = [ALL_TARGETS, ["query", "value"], ["key"], ["dense"]]


class BernoulliElements(TorchDispatchMode):
    """Counts the elements every `bernoulli_` draws (the dropout masks)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket == torch.ops.aten.bernoulli_:
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def tiny_encoder(tiny_bert_dir: Path, targets: list[str] | None) -> tuple[torch.nn.Module, Shapes]:
    """The tiny BERT's encoder (no pooler: the floor counts the layers), eager attention so that
    its products are plain matmuls, with LoRA pairs on `targets` (None: none)."""
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(tiny_bert_dir)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(config, add_pooling_layer=False)
    model.set_attn_implementation("eager")
    shapes = bert_shapes(config, LORA_RANK, targets or ALL_TARGETS, LORA_DROPOUT)
    if targets:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=LORA_RANK, target_modules=targets, lora_dropout=LORA_DROPOUT)
        )
    return model, shapes


def one_text() -> dict[str, torch.Tensor]:
    ids = torch.arange(1000, 1000 + TOKENS).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_forward_flops_are_pytorchs_count(tiny_bert_dir: Path) -> None:
    model, shapes = tiny_encoder(tiny_bert_dir, None)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**one_text())
    assert shapes.forward(np.array([TOKENS]), lora=False) == counter.get_total_flops()


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
def test_training_flops_are_pytorchs_count(tiny_bert_dir: Path, targets: list[str]) -> None:
    model, shapes = tiny_encoder(tiny_bert_dir, targets)
    model.train()
    with torch.random.fork_rng(), FlopCounterMode(display=False) as counter:
        model(**one_text()).last_hidden_state.sum().backward()
    assert shapes.train_step(np.array([TOKENS])) == counter.get_total_flops()


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
def test_mask_elements_are_the_dropout_draws(tiny_bert_dir: Path, targets: list[str]) -> None:
    model, shapes = tiny_encoder(tiny_bert_dir, targets)
    model.train()
    with torch.random.fork_rng(), BernoulliElements() as draws:
        model(**one_text())
    assert draws.elements == shapes.mask_elements(np.array([TOKENS]))


def test_other_encoders_and_targets_are_refused(tiny_bert_dir: Path) -> None:
    from transformers import AutoConfig, DistilBertConfig

    config = AutoConfig.from_pretrained(tiny_bert_dir)
    with pytest.raises(ValueError, match="not 'distilbert'"):
        bert_shapes(DistilBertConfig(), 8, ["q_lin"], 0.1)
    with pytest.raises(ValueError, match="output.dense"):
        bert_shapes(config, 8, ["output.dense"], 0.1)
    with pytest.raises(ValueError, match="not '.*query.*'"):
        bert_shapes(config, 8, ".*query", 0.1)


def test_masks_are_the_serial_mt19937_stream_off_intel() -> None:
    """What the floor's mask line rests on, a property of torch's CPU kernel: on a CPU not made by
    Intel, `bernoulli_` draws two 32-bit MT19937 numbers per element, serially, from the default
    generator (on Intel's, MKL's generator, in parallel)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to tell the CPU's maker")
    if "GenuineIntel" in cpuinfo.read_text():
        pytest.skip("an Intel CPU: torch draws the mask from MKL's generator")
    threads = torch.get_num_threads()
    assert mask_cost(shape=(4, 1000))["mt19937_serial"]
    assert torch.get_num_threads() == threads
