"""``python -m nequip_sus2.bench ...`` = ``nequip-sus2 bench ...``."""

import sys

from .cli import main

sys.exit(main())
