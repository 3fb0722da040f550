"""`python -m outrider ...`: the same entry point as the `outrider` console script."""

import sys

from outrider.cli import main

if __name__ == "__main__":
    sys.exit(main())
