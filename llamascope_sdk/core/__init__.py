"""The math and the hook points: sites, hyperparams, folding, hooks, feature statistics, the
logit lens and metrics. Imports only :mod:`llamascope_sdk.base`."""
