"""``python -m llamascope_sdk`` runs the ``llamascope`` command line."""

from llamascope_sdk.cli import main

main()
