"""Train / validation / test by a stable hash of the patient id: a patient never crosses splits, and the same
patient lands in the same split on every run, machine and Python version (SHA-256, not ``hash()``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitRule:
    salt: str = "odyssey-v1"
    train: float = 0.8
    validation: float = 0.1  # the rest is test

    def __post_init__(self) -> None:
        if not (self.train > 0 and self.validation >= 0 and self.train + self.validation <= 1):
            raise ValueError(f"split fractions must be positive and sum to at most 1: {self}")

    def position(self, patient_id: str) -> float:
        """The patient's place in [0, 1): the first 8 bytes of SHA-256(salt:patient_id)."""
        digest = hashlib.sha256(f"{self.salt}:{patient_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def split(self, patient_id: str) -> str:
        x = self.position(patient_id)
        if x < self.train:
            return "train"
        if x < self.train + self.validation:
            return "validation"
        return "test"

    def describe(self) -> dict:
        return {
            "rule": "sha256(salt + ':' + patient_id), first 8 bytes as a fraction of 2**64",
            "salt": self.salt,
            "train": [0.0, self.train],
            "validation": [self.train, self.train + self.validation],
            "test": [self.train + self.validation, 1.0],
        }
