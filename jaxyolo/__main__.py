"""``python -m jaxyolo ...`` is the ``jaxyolo`` command."""

import sys

from jaxyolo.cli import main

sys.exit(main())
