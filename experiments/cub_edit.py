"""`python -m experiments.cub_edit` from a checkout: `saejax cub_edit` (`saejax.cli.cub_edit`)."""
from saejax.cli.cub_edit import main

if __name__ == "__main__":
    main()
