"""`python -m pid_jax`: the same command line as the `pid-jax` script."""

import sys

from pid_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
