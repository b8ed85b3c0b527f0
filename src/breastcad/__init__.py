"""breastcad: honest, fast deep-learning classifiers for breast ultrasound and mammograms."""

from __future__ import annotations

__version__ = "0.1.0"
