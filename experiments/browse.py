"""`python -m experiments.browse` from a checkout: `saejax browse` (`saejax.cli.browse`)."""
from saejax.cli.browse import main

if __name__ == "__main__":
    main()
