"""`python -m leukoflow.cli`: the command line, as the `leukoflow` script runs it."""

from leukoflow.cli import main

main()
