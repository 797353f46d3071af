"""``python -m tam_hf.compare RECIPE.yaml --optimizers ... --seeds N``: the same as ``tam-finetune compare``."""

import sys

from tam_hf.commands.compare import main

sys.exit(main())
