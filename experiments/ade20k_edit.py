"""`python -m experiments.ade20k_edit` from a checkout: `saejax ade20k_edit` (`saejax.cli.ade20k_edit`)."""
from saejax.cli.ade20k_edit import main

if __name__ == "__main__":
    main()
