"""`python -m saejax.cli COMMAND ...`, the same as the `saejax` console script."""

from saejax.cli import main

main()
