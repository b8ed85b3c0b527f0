"""Sub-commands beyond audit/train/predict: one module each, ``add_parser`` + ``run``."""
