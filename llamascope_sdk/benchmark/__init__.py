"""``llamascope bench``: SAEBench's reliable metrics for any SAE or transcoder the SDK loads, on
plain ``transformers`` models through the SDK's hooks, each number with its reseed spread.

Modules: :mod:`.activations` (prompt activations captured once per hook point, on disk),
:mod:`.datasets` (the sae-probes datasets, from the installed package), :mod:`.probing` (the
sae-probes sparse-probing protocol), :mod:`.core` (SAEBench's core metrics from
:func:`~llamascope_sdk.evaluation.evaluate.evaluate`), :mod:`.absorption` (first-letter
absorption), :mod:`.autointerp` (SAEBench's autointerp through ``llamascope explain``),
:mod:`.spread` (spreads and the within-noise rule), :mod:`.report` (SAEBench JSON, the table,
the plot) and :mod:`.run` (:func:`benchmark`, what the command calls).

TPP and SCR are not offered: the reliability audit of SAEBench's metrics (Chanin 2026,
arXiv 2605.18229) finds they should not be used.
"""
