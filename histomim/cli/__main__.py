"""``python -m histomim.cli`` / ``accelerate launch -m histomim.cli pretrain ...``."""

import sys

from . import main

sys.exit(main())
