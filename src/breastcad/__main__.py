"""``python -m breastcad`` (also what ``torchrun -m breastcad`` runs)."""

from __future__ import annotations

import sys

from breastcad.cli import main

sys.exit(main())
