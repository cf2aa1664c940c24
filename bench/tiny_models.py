"""A base-model folder of any supported family with random weights, built offline from its config.

For tests, benches and trying a family's path through the pipeline without a download: the
weights are random (nothing is learnt but what the LoRA run learns), the tokenizer a byte-level
BPE trained with `tokenizers` on the given texts, with the family's special tokens and template
(`[CLS] x [SEP]`, `<s> x </s>`, `x </s>`, `<s> x`, or none; decoders without a pad token, as
GPT-2, Llama and Qwen ship). The folder holds what a hub checkpoint of the family holds: the
backbone's weights (a causal LM for decoders) as safetensors, config.json and the tokenizer.

    python -m bench.tiny_models qwen2 models/tiny-qwen2            # 2 layers, hidden 64
    python -m bench.tiny_models llama models/tiny-llama --layers 4 --hidden 256
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

# Special tokens, in id order from 0, and the template that wraps one text.
SPECIALS = {
    "cls_sep": (("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), "[CLS] $A [SEP]"),
    "s_s": (("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s> $A </s>"),
    "t5": (("<pad>", "</s>", "<unk>"), "$A </s>"),
    "bos": (("<unk>", "<s>", "</s>"), "<s> $A"),
    "none": (("<|endoftext|>",), None),
}
# The tokenizer attributes each style sets (what transformers reads as pad, EOS, ...).
TOKEN_ROLES = {
    "cls_sep": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
    "s_s": {
        "bos_token": "<s>",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "mask_token": "<mask>",
    },
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
    "bos": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "none": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
}
# The style of each model type's released tokenizers.
STYLE = {
    "bert": "cls_sep",
    "distilbert": "cls_sep",
    "electra": "cls_sep",
    "deberta-v2": "cls_sep",
    "modernbert": "cls_sep",
    "roberta": "s_s",
    "xlm-roberta": "s_s",
    "mpnet": "s_s",
    "t5": "t5",
    "llama": "bos",
    "mistral": "bos",
    "gemma": "bos",
    "gpt2": "none",
    "qwen2": "none",
    "qwen3": "none",
}
MAX_POSITIONS = 512


def default_texts() -> list[str]:
    """Words of the four AG News topics, enough for a small vocabulary."""
    topics = (
        "election minister parliament war treaty president government vote",
        "match goal season coach league team player cup win",
        "shares profit market bank earnings stocks oil prices company",
        "software chip internet space computer microsoft google research",
    )
    return [
        f"{a} {b}, the {c}."
        for t in topics
        for a in t.split()
        for b in t.split()
        for c in t.split()
    ]


def build_tokenizer(style: str, texts: Iterable[str], vocab_size: int):
    """A fast tokenizer (transformers `PreTrainedTokenizerFast`) with the style's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, template = SPECIALS[style]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    if template is not None:
        pairs = template.replace("$A", "$A $B")
        used = [t for t in specials if t in template]
        tok.post_processor = processors.TemplateProcessing(
            single=template, pair=pairs, special_tokens=[(t, tok.token_to_id(t)) for t in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **TOKEN_ROLES[style])


def build_config(model_type: str, tokenizer, layers: int, hidden: int, heads: int):
    """The family's config at this size, its special-token ids from the tokenizer."""
    from transformers import AutoConfig

    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    ids = {k: v for k, v in ids.items() if v is not None}
    size = {"vocab_size": len(tokenizer)}
    ffn = 2 * hidden
    if model_type == "gpt2":
        size |= {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_positions": MAX_POSITIONS}
    elif model_type == "t5":
        size |= {
            "d_model": hidden,
            "d_ff": ffn,
            "d_kv": hidden // heads,
            "num_layers": layers,
            "num_heads": heads,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }
    elif model_type == "distilbert":
        size |= {
            "dim": hidden,
            "hidden_dim": ffn,
            "n_layers": layers,
            "n_heads": heads,
            "max_position_embeddings": MAX_POSITIONS,
        }
    else:
        size |= {
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": MAX_POSITIONS,
        }
    if model_type in ("roberta", "xlm-roberta"):
        size["max_position_embeddings"] = MAX_POSITIONS + 2
    if model_type == "electra":
        size["embedding_size"] = hidden
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        size |= {"num_key_value_heads": max(1, heads // 2), "head_dim": hidden // heads}
        size["tie_word_embeddings"] = model_type == "gemma"
    if model_type == "deberta-v2":
        # DeBERTa-v3's attention: relative positions, disentangled content/position terms.
        size |= {
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": False,
            "position_buckets": 64,
            "norm_rel_ebd": "layer_norm",
            "share_att_key": True,
            "max_relative_positions": -1,
        }
    if model_type == "modernbert":
        size |= {"global_attn_every_n_layers": 2, "local_attention": 16}
        ids.setdefault("cls_token_id", tokenizer.cls_token_id)
        ids.setdefault("sep_token_id", tokenizer.sep_token_id)
    return AutoConfig.for_model(model_type, **size, **ids)


def build(
    model_type: str,
    out: Path,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab_size: int = 1000,
    texts: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a random `model_type` base of this size to `out`: weights, config, tokenizer."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = build_tokenizer(STYLE[model_type], texts or default_texts(), vocab_size)
    config = build_config(model_type, tokenizer, layers, hidden, heads)
    torch.manual_seed(seed)
    kind = AutoModelForCausalLM if STYLE[model_type] in ("bos", "none") else AutoModel
    model = kind.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_type", choices=sorted(STYLE))
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args()
    build(args.model_type, args.out, args.layers, args.hidden, args.heads, args.vocab_size)
    print(f"{args.model_type}: {args.out}")


if __name__ == "__main__":
    main()
