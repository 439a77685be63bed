"""The words leukoflow's code and its outputs share, each defined once.

Labels, image statuses, run kinds and run outcomes are string enums: they compare equal to the
strings stored in Parquet and JSON (`Label.ALL == "all"`), so tables written before this module
existed read the same, and a misspelt member is an AttributeError instead of a silent mismatch.
The one flag rule, the one non-clinical notice and the one short-id rule live here too.

Imports nothing heavy: the command line reads its choices from here without loading numpy.
"""

from __future__ import annotations

from enum import StrEnum


class Label(StrEnum):
    """A cell's class: ALL (acute lymphoblastic leukemia, the positive class) or normal."""

    ALL = "all"
    HEM = "hem"  # C-NMC's name for normal (haematogones)

    @property
    def code(self) -> int:
        """1 for ALL, 0 for normal: the classifiers' targets."""
        return int(self is Label.ALL)

    @classmethod
    def of(cls, flagged: bool) -> Label:
        """The label a decision gives: ALL when flagged."""
        return cls.ALL if flagged else cls.HEM


class ImageStatus(StrEnum):
    """What the catalog says of an image."""

    OK = "ok"
    QUARANTINED = "quarantined"  # unreadable or not a cell image; the reason is recorded
    DUPLICATE = "duplicate"  # same content as an earlier image of the dataset


class RunKind(StrEnum):
    """Which command wrote a run row (`runs/`)."""

    RUN = "run"
    VALIDATE = "validate"
    EXPERIMENTS = "experiments"
    SCORE = "score"
    BACKFILL = "backfill"


class Outcome(StrEnum):
    """How a run ended (`running` while it has not)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    BUSY = "busy"  # another sweep held the store's lease
    TIMED_OUT = "timed_out"


# The one flag rule: a cell (or, with a patient score, a patient) is flagged as ALL-like when
# its score is at or above the threshold. Written into model records and summaries as text.
THRESHOLD_RULE = "score >= threshold means all"


def flagged(scores, threshold: float):
    """THRESHOLD_RULE: True where a score is at or above the threshold. `scores` is one float
    (a bool comes back) or a numpy array (a bool array, element by element)."""
    return scores >= threshold


# The one notice every output of a `--weights none` model carries, in every wording's place.
NON_CLINICAL_NOTICE = (
    "NOT CLINICALLY MEANINGFUL: features from random-initialised networks (--weights none)"
)

# How messages, logs and pages name an image: the start of its content id (never a subject id
# or a file name, which can carry patient identifiers).
SHORT_ID_CHARS = 12


def short_id(image_id: str) -> str:
    """The first SHORT_ID_CHARS characters of a content id."""
    return image_id[:SHORT_ID_CHARS]
