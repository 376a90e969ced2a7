"""``python -m llamascope_sdk`` runs the ``llamascope`` command line."""

from .cli import main

main()
