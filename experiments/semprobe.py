"""`python -m experiments.semprobe` from a checkout: `saejax semprobe` (`saejax.cli.semprobe`)."""
from saejax.cli.semprobe import main

if __name__ == "__main__":
    main()
