"""`python -m paratransfer` is the same as `paratransfer` (so `torchrun -m paratransfer` works)."""

import sys

from paratransfer.cli.entry import main

sys.exit(main())
