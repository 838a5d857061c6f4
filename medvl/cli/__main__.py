"""``python -m medvl.cli``: the same as the ``medvl`` command."""

import sys

from medvl.cli import main

sys.exit(main())
