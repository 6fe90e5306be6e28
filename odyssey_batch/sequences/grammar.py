"""The EHRMamba sequence grammar: special tokens, token types and interval tokens.

A patient is one sequence::

    [CLS] [VS] e e … [VE] [REG] <interval> [VS] e … [VE] [REG] …

one visit per group of overlapping encounters, events in time order inside a visit, and between two visits an
interval token for the real gap from the end of one to the start of the next (whole days):

=================  ===========================================
``[W_0]``–``[W_3]``  under 4 weeks, by week (0–6, 7–13, 14–20, 21–27 days)
``[M_0]``–``[M_12]`` 28–365 days, by 30 days (``[M_0]`` is 28–29 days, ``[M_12]`` 360–365)
``[LT]``            more than 365 days
=================  ===========================================

These are the thresholds of the reference design (``ehrmamba-spec.md`` §8.2), kept so that sequences compare.
"""

from __future__ import annotations

from enum import IntEnum

PAD, UNK, MASK, CLS, VS, VE, REG = "[PAD]", "[UNK]", "[MASK]", "[CLS]", "[VS]", "[VE]", "[REG]"
WEEK_TOKENS = tuple(f"[W_{i}]" for i in range(4))
MONTH_TOKENS = tuple(f"[M_{i}]" for i in range(13))
LONG_TERM = "[LT]"
INTERVAL_TOKENS = (*WEEK_TOKENS, *MONTH_TOKENS, LONG_TERM)
# Fixed ids 0..24: every vocabulary starts with these, in this order.
SPECIAL_TOKENS = (PAD, UNK, MASK, CLS, VS, VE, REG, *INTERVAL_TOKENS)


class TokenType(IntEnum):
    """The token-type side stream."""

    PAD = 0
    CLS = 1
    VS = 2
    VE = 3
    INTERVAL = 4
    REG = 5
    CONDITION = 6
    PROCEDURE = 7
    MEDICATION = 8
    LAB = 9
    TASK = 10


# Event kinds, in the order events of the same instant are listed inside a visit (diagnoses first, then what
# was done about them, then results), and the prefix of their tokens: codes of different kinds never collide.
EVENT_KINDS = (TokenType.CONDITION, TokenType.PROCEDURE, TokenType.MEDICATION, TokenType.LAB)
KIND_PREFIX = {
    TokenType.CONDITION: "cond",
    TokenType.PROCEDURE: "proc",
    TokenType.MEDICATION: "med",
    TokenType.LAB: "lab",
}
PREFIX_KIND = {v: k for k, v in KIND_PREFIX.items()}


def interval_token(gap_days: int) -> str:
    """The interval token for a gap of whole days between two visits (the gap is never negative: overlapping
    encounters are one visit)."""
    if gap_days < 0:
        raise ValueError(f"a gap between visits cannot be negative ({gap_days} days): overlapping visits merge")
    if gap_days < 28:
        return WEEK_TOKENS[gap_days // 7]
    if gap_days <= 365:
        return MONTH_TOKENS[gap_days // 30]
    return LONG_TERM


def task_token(task: str) -> str:
    """The prompt token of a clinical task (multitask prompted finetuning)."""
    return f"[TASK:{task}]"
