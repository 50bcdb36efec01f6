"""`python -m pixformer ...` is the `pixformer` command (and `torchrun -m pixformer ...` can launch it)."""
import sys

from .cli import main

sys.exit(main())
