"""The EHRMamba model."""

from __future__ import annotations


def default_device():
    """The GPU when there is one (training, evaluation and scoring run there), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
