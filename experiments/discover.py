"""`python -m experiments.discover` from a checkout: `saejax discover` (`saejax.cli.discover`)."""
from saejax.cli.discover import main

if __name__ == "__main__":
    main()
