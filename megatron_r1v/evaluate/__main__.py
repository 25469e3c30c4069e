"""``python -m megatron_r1v.evaluate``: see the package docstring."""

import sys

from megatron_r1v.evaluate.cli import main

sys.exit(main())
