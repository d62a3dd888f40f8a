"""``python -m napari_mevae ...`` is ``mevae ...``; torchrun uses it:
``torchrun --nproc_per_node=2 -m napari_mevae train --distributed ...``."""

import sys

from .cli import main

sys.exit(main())
