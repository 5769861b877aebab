"""``python -m hetsched`` is the ``hetsched`` command."""

import sys

from hetsched.cli.main import main

sys.exit(main())
