"""Loading: the registry of the 256 releases, the release layout, the Hub, foreign formats,
models, the :class:`SAE` class, conversions, cards and activation capture."""
