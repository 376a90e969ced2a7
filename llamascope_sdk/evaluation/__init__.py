"""Evaluation: reconstruction metrics of an SAE in a model (:func:`evaluate`) and the steering
evaluation (sweeps, metrics, judge, plots)."""
