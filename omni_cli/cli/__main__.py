"""`python -m omni_cli.cli ARGS` (how torchrun starts `omni finetune`) is `omni ARGS`."""

import sys

from omni_cli.cli import main

sys.exit(main())
