"""``python -m imgclf``: the command line (what ``torchrun -m imgclf train ...`` starts on each rank)."""

import sys

from imgclf.cli import main

sys.exit(main())
