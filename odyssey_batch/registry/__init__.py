"""The model registry: versioned model artifacts, their evaluations, and which version is the champion.

``versions`` registers models (``ops.model_version``, artifacts under ``models/v<N>/`` in the object store) and
records their evaluations; ``promotion`` decides the champion by rule, by hand or by rollback
(``ops.model_promotion``); ``artifacts`` reads the files back, verified against their checksums.
"""

from odyssey_batch.registry import artifacts
from odyssey_batch.registry.artifacts import CorruptArtifactError
from odyssey_batch.registry.promotion import (
    Decision,
    PromotionRule,
    decide,
    force_promote,
    history,
    promote,
    rollback,
)
from odyssey_batch.registry.versions import (
    ModelVersion,
    add_files,
    champion,
    evaluations,
    get,
    list_versions,
    record_evaluation,
    register,
    update_metrics,
)

__all__ = [
    "CorruptArtifactError",
    "Decision",
    "ModelVersion",
    "PromotionRule",
    "add_files",
    "artifacts",
    "champion",
    "decide",
    "evaluations",
    "force_promote",
    "get",
    "history",
    "list_versions",
    "promote",
    "record_evaluation",
    "register",
    "rollback",
    "update_metrics",
]
