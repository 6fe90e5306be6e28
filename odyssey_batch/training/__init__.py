"""Training EHRMamba: data from a dataset version, pretraining, checkpoints."""
