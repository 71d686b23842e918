"""`python -m hiercomp.cli`."""

import sys

from hiercomp.cli import main

sys.exit(main())
