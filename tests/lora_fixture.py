"""A tiny LoRA adapter saved the way the train stage saves one, for export and predict tests."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA adapter saved as the train stage saves one, with non-zero LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    # LoRA's A matrices are drawn from the global generator: seeded, the adapter does not depend
    # on which tests ran before.
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(str(out))
    return out
