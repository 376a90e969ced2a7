"""Shared base: errors, atomic writes, paths, dtypes, devices, terminal output, fingerprints,
the HTTP client for OpenAI-compatible endpoints and the torch.distributed helper. Imports no
other folder of the package."""
