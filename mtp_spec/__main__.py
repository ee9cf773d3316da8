"""`python -m mtp_spec ...` (and `torchrun -m mtp_spec ...`) runs the CLI."""

import sys

from mtp_spec.cli import main

sys.exit(main())
