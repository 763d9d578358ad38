"""`python -m quantkit <verb>` (also what torchrun launches)."""

import sys

from quantkit.cli import main

sys.exit(main())
