"""`python -m experiments.demo` from a checkout: `saejax demo` (`saejax.cli.demo`)."""
from saejax.cli.demo import main

if __name__ == "__main__":
    main()
