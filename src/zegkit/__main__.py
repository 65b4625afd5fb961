"""`python -m zegkit` (and `torchrun ... -m zegkit eval`) runs the command line."""

import sys

from zegkit.cli import main

sys.exit(main())
