"""Steering: interventions, attaching SAEs to a model, per-row edits, generation (single and
batched), the SAE pool, reading features and the lm-eval export."""
