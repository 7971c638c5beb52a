"""``python -m omniseg`` (and ``torchrun -m omniseg``) runs the command line."""

import sys

from omniseg.cli.main import main

sys.exit(main())
