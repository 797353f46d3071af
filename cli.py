"""`python cli.py recipe.yaml ...` is `tam-finetune recipe.yaml ...` (for a checkout without the console script)."""

import sys

from tam_hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
