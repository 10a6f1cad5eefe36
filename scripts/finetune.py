#!/usr/bin/env python
"""Fine-tune an encoder for image classification: full (layer-wise lr decay) or LoRA adapters.

The same as `histomim finetune`: `python scripts/finetune.py --help` explains every option.
"""

import sys

from histomim.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
