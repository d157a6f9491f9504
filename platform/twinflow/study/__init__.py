"""The small-scale study (digits and 2-D mixtures) run through Ray Train: datasets, nets, trainer, metrics, report."""
