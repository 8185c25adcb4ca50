"""Everything that runs inside a Ray task: models, datasets, attacks, metrics."""
