"""The training tests' SAE factory: a tiny recipe on a small generated corpus.

The tiny Llama (``tiny_llama``, d_model 64, context window 128) and the character tokenizer
(``char_tokenizer``) are the suite-wide fixtures of ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox {i % 7} jumps over the lazy dog number {i * 13 % 97}. "
    "To be or not to be, that is the question; whether 'tis nobler in the mind." for i in range(160))

#: Hidden size of the shared ``tiny_llama`` fixture.
D_MODEL = 64


def corpus(folder: Path) -> Path:
    path = Path(folder) / "corpus.txt"
    path.write_text(TEXT)
    return path


def tiny_config(tmp: Path, **kw):  # noqa: ANN201
    """A TrainConfig for ``tiny_llama``'s block-1 residual stream (d_sae 256, K 4)."""
    from llamascope_sdk.training.config import TrainConfig

    base = dict(name="tiny-L1R", model="tiny", hook_point_in="blocks.1.hook_resid_post",
                hook_point_out="blocks.1.hook_resid_post", d_model=D_MODEL, expansion_factor=4,
                top_k=4, dataset=str(corpus(tmp)), context_size=64, store_batch_size=4,
                buffer_tokens=512, total_tokens=64 * 40, batch_size=64, lr=1e-3,
                lr_warmup_steps=0.1, norm_tokens=256, threshold_tokens=256,
                output_dir=str(tmp / "runs"), checkpoint_every=10, log_every=5,
                split_long_documents=True)
    base.update(kw)
    return TrainConfig(**base)
