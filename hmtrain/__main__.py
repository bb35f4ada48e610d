"""`python -m hmtrain ...` is the `hmtrain` command (what torchrun's `-m hmtrain` runs)."""
import sys

from hmtrain.cli import main

sys.exit(main())
