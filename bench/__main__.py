"""`python -m bench [--smoke] [--out DIR]`."""

import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main())
