"""`python -m experiments.compare` from a checkout: `saejax compare` (`saejax.cli.compare`)."""
from saejax.cli.compare import main

if __name__ == "__main__":
    main()
