"""Writes tests/data/store_v3 with the SDK at main 268e887 (store format version 3, ragged):
``PYTHONPATH=<checkout of 268e887> python tests/data/make_store_v3.py tests/data``."""
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamascope_sdk.mining.mine import mine
from llamascope_sdk.store.feature_store import FeatureStore
from tests.conftest import CharTokenizer
from tests.test_hooks import synthetic_sae
from tests.test_mining import DOCS

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
model = LlamaForCausalLM(cfg).eval()
torch.manual_seed(0)
ids = torch.randint(3, 99, (2, 24))
ids[:, 0] = 1
sae = synthetic_sae(model, ids, 1, "R", d_sae=64, l0=6)
res = mine(model, CharTokenizer(), sae, DOCS, tokens=400, context=40, batch_size=3, top_n=3,
           n_samples=8, deciles=4, example_context=8, n_nonactivating=4, nonactivating_pool=12,
           window_before=3, window_after=1, progress=False)[sae.name]
store = FeatureStore.from_result(res, CharTokenizer(), sae_spec="tiny", corpus="docs")
store = FeatureStore.load(store.save(out / "store_v3"))
expect = {str(i): {"top": store.examples(i), "deciles": store.decile_examples(i),
                   "non_activating": store.non_activating(i)} for i in range(64)}
(out / "store_v3_expected.json").write_text(json.dumps(expect, indent=0, sort_keys=True) + "\n")
