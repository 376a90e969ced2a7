"""Splice an SAE's reconstruction into the forward pass and ablate features, measuring the loss.

With the error term the spliced model equals the clean one; without it the loss rises by the
SAE's reconstruction error; ablating the most active features (keeping the error term) changes
only what those features wrote.
"""

import torch

from llamascope_sdk import SAE, attach, load_model
from llamascope_sdk.demo import DEMO_MODEL, DEMO_SAE_DIR
from llamascope_sdk.interventions import Ablate
from llamascope_sdk.models import tokenize

sae = SAE.from_pretrained(DEMO_SAE_DIR)
model, tokenizer = load_model(DEMO_MODEL)
TEXT = (
    "The history of the city begins in the Roman period, when a small fort was built on the hill "
    "above the river. In the Middle Ages a market grew around the cathedral, and merchants from "
    "across the region came to trade wool, salt and wine. The old town walls were pulled down in "
    "the nineteenth century to make room for the railway station and the new boulevards."
)
ids = tokenize(tokenizer, TEXT)


def loss(**kw) -> float:
    with torch.no_grad():
        return float(model(ids, labels=ids, **kw).loss)


clean = loss()
with attach(model, [sae], splice=True, error_term=True):
    with_error = loss()
with attach(model, [sae], splice=True, error_term=False):
    without_error = loss()
with attach(model, [sae]) as h:
    model(ids)
top = h.features[sae.name][0].sum(0).topk(5).indices.tolist()
with attach(model, interventions=[Ablate(sae, top, mode="zero")]):
    ablated = loss()

print(f"clean loss                       {clean:.4f}")
print(f"spliced, with error term         {with_error:.4f}   (identical by construction)")
print(f"spliced, reconstruction only     {without_error:.4f}   (delta LM loss {without_error - clean:+.4f})")
print(f"top-5 features {top} ablated  {ablated:.4f}")
