"""`python -m experiments.train_vit` from a checkout: `saejax train_vit` (`saejax.cli.train_vit`)."""
from saejax.cli.train_vit import main

if __name__ == "__main__":
    main()
