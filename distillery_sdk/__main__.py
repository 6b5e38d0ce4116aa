"""``python -m distillery_sdk``: the ``distillery`` command line."""

from distillery_sdk.cli import main

main()
