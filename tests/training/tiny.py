"""Tiny fixtures for training tests: a character tokenizer, a tiny Llama, a small corpus."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 99
TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox {i % 7} jumps over the lazy dog number {i * 13 % 97}. "
    "To be or not to be, that is the question; whether 'tis nobler in the mind." for i in range(160))


class CharTokenizer:
    """bos=1, eos=2, pad=0; characters map to 3..98."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    all_special_ids = [0, 1, 2]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + (ord(c) % (VOCAB - 3)) for c in text]}


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def corpus(folder: Path) -> Path:
    path = Path(folder) / "corpus.txt"
    path.write_text(TEXT)
    return path


def tiny_config(tmp: Path, **kw):
    from llamascope_sdk.training.config import TrainConfig

    base = dict(name="tiny-L1R", model="tiny", hook_point_in="blocks.1.hook_resid_post",
                hook_point_out="blocks.1.hook_resid_post", d_model=32, expansion_factor=4,
                top_k=4, dataset=str(corpus(tmp)), context_size=64, store_batch_size=4,
                buffer_tokens=512, total_tokens=64 * 40, batch_size=64, lr=1e-3,
                lr_warmup_steps=0.1, norm_tokens=256, threshold_tokens=256,
                output_dir=str(tmp / "runs"), checkpoint_every=10, log_every=5,
                split_long_documents=True)
    base.update(kw)
    return TrainConfig(**base)
