"""``python -m longrope …`` is the ``longrope`` command."""

import sys

from longrope.cli import main

sys.exit(main())
