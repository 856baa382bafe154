"""``python -m morphseek``: the ``morphseek`` command."""

import sys

from .cli import main

sys.exit(main())
