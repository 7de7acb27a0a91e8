"""``python -m pipeline.validate output.dir=...``."""

import sys

from pipeline.validate.cli import main

if __name__ == "__main__":
    sys.exit(main())
