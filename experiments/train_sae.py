"""`python -m experiments.train_sae` from a checkout: `saejax train` (`saejax.cli.train_sae`)."""
from saejax.cli.train_sae import main

if __name__ == "__main__":
    main()
