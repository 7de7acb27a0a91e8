"""``python -m jobs.bench``: the benchmark (see :mod:`jobs.bench.run`)."""

import sys

from .run import main

sys.exit(main())
