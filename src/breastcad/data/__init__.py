"""Data layer: sources -> Sample records -> audit -> grouped folds -> cached arrays."""
