"""`python -m fewtune ...` is the `fewtune` command."""

import sys

from .cli import main

sys.exit(main())
