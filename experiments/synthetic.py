"""`python -m experiments.synthetic` from a checkout: `saejax synthetic` (`saejax.cli.synthetic`)."""
from saejax.cli.synthetic import main

if __name__ == "__main__":
    main()
