"""Which model version is the champion: the promotion rule, manual promotion and rollback.

A candidate replaces the champion when, on the tasks both were scored on, its mean metric is at least
``min_mean_gain`` better and no single task is more than ``max_task_drop`` worse. Both sets of numbers come from
the candidate's own evaluation (``ops.model_evaluation``): method ``model`` for the candidate and method
``champion`` for the current champion scored on the same test points, so the comparison is paired. Every
decision, automatic or manual, is a row of ``ops.model_promotion``; decisions are serialized by a transaction
advisory lock plus row locks, so two concurrent promotions cannot both win (and the database allows one
champion at most anyway).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg2.extensions
from psycopg2.extras import Json

from odyssey_batch.registry.versions import ModelVersion, fetch_champion, fetch_version
from odyssey_batch.warehouse import connect, transaction

METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1", "f1_tuned": "tuned F1", "brier": "Brier", "ece": "ECE"}
LOWER_IS_BETTER = frozenset({"brier", "ece"})
SPLITS = ("validation", "test")
# Any constant works: it serializes promotion decisions on one database.
_LOCK_KEY = 0x0D7554
# Float noise allowance, so that 0.80 - 0.78 counts as a drop of exactly 0.02.
_EPS = 1e-9


@dataclass(frozen=True)
class PromotionRule:
    """When a candidate may replace the champion (differences are in the metric's own units)."""

    metric: str = "auroc"
    split: str = "test"
    max_task_drop: float = 0.02
    min_mean_gain: float = 0.0

    def __post_init__(self) -> None:
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(METRIC_NAMES)}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; known: {', '.join(SPLITS)}")
        if self.max_task_drop < 0:
            raise ValueError("max_task_drop must not be negative")


@dataclass(frozen=True)
class Decision:
    """The outcome of the promotion rule: whether to promote, why (a readable sentence), and the numbers."""

    promote: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def _present(values: dict[str, float | None] | None) -> dict[str, float]:
    return {t: float(v) for t, v in (values or {}).items() if v is not None and not math.isnan(float(v))}


def _signed(x: float) -> str:
    return f"{'−' if x < -_EPS else '+'}{abs(x):.3f}"


def decide(
    candidate: dict[str, float | None],
    champion: dict[str, float | None] | None,
    rule: PromotionRule = PromotionRule(),
    *,
    champion_version: int | None = None,
) -> Decision:
    """Apply ``rule`` to per-task numbers of the candidate and of the champion (None: there is no champion).

    Tasks without a number (None or NaN) on either side are left out of the comparison. A pure function.
    """
    name = METRIC_NAMES[rule.metric]
    lower_better = rule.metric in LOWER_IS_BETTER
    mine = _present(candidate)
    details: dict[str, Any] = {"metric": rule.metric, "split": rule.split, "rule": asdict(rule)}
    if not mine:
        return Decision(False, f"not evaluated: no {rule.split} {name} for any task", details)
    if champion is None:
        mean = sum(mine.values()) / len(mine)
        details.update(candidate_mean=mean, tasks={t: {"candidate": v} for t, v in sorted(mine.items())})
        return Decision(True, f"no champion yet (mean {name} {mean:.3f} over {len(mine)} tasks)", details)

    theirs = _present(champion)
    label = f"champion v{champion_version}" if champion_version is not None else "champion"
    details["champion_version"] = champion_version
    common = sorted(set(mine) & set(theirs))
    details.update(candidate_only=sorted(set(mine) - set(theirs)), champion_only=sorted(set(theirs) - set(mine)))
    if not common:
        return Decision(
            False,
            f"no tasks with a {rule.split} {name} in common with the {label} "
            f"(candidate: {', '.join(sorted(mine))}; champion: {', '.join(sorted(theirs)) or 'none'})",
            details,
        )

    tasks = {}
    drops = {}
    for task in common:
        gain = theirs[task] - mine[task] if lower_better else mine[task] - theirs[task]
        tasks[task] = {"candidate": mine[task], "champion": theirs[task], "gain": gain}
        if -gain > rule.max_task_drop + _EPS:
            drops[task] = -gain
    mean_mine = sum(mine[t] for t in common) / len(common)
    mean_theirs = sum(theirs[t] for t in common) / len(common)
    mean_gain = mean_theirs - mean_mine if lower_better else mean_mine - mean_theirs
    gain_ok = mean_gain >= rule.min_mean_gain - _EPS
    details.update(
        tasks=tasks,
        candidate_mean=mean_mine,
        champion_mean=mean_theirs,
        mean_gain=mean_gain,
        drops=drops,
        compared=len(common),
    )

    mean_text = (
        f"mean {name} {mean_mine:.3f} vs {label} {mean_theirs:.3f} "
        f"({_signed(mean_gain)} {'≥' if gain_ok else '<'} {rule.min_mean_gain:.3f})"
    )
    verb = "worsens" if lower_better else "drops"
    drop_texts = [f"{task} {verb} {drop:.3f} > {rule.max_task_drop:.3f}" for task, drop in sorted(drops.items())]
    if gain_ok and not drops:
        return Decision(True, f"{mean_text}; no task {verb} more than {rule.max_task_drop:.3f}", details)
    return Decision(False, "; ".join([*drop_texts, mean_text] if gain_ok else [mean_text, *drop_texts]), details)


def _lock(cur: psycopg2.extensions.cursor) -> None:
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))


def _record(
    cur: psycopg2.extensions.cursor,
    action: str,
    version: int,
    previous: int | None,
    actor: str,
    reason: str,
    details: dict[str, Any],
) -> None:
    cur.execute(
        """INSERT INTO ops.model_promotion (action, model_version, previous_champion, actor, reason, details)
           VALUES (%s, %s, %s, %s, %s, %s)""",
        (action, version, previous, actor, reason, Json(details)),
    )


def _crown(
    cur: psycopg2.extensions.cursor,
    new: ModelVersion,
    previous: ModelVersion | None,
    *,
    action: str,
    actor: str,
    reason: str,
    status_reason: str,
    retired_reason: str,
    details: dict[str, Any],
) -> None:
    """Retire ``previous`` (first: the database allows one champion) and make ``new`` the champion, recorded."""
    if previous is not None:
        cur.execute(
            "UPDATE ops.model_version SET status = 'retired', status_reason = %s, status_changed_at = now() "
            "WHERE model_version = %s",
            (retired_reason, previous.model_version),
        )
    cur.execute(
        "UPDATE ops.model_version SET status = 'champion', status_reason = %s, status_changed_at = now() "
        "WHERE model_version = %s",
        (status_reason, new.model_version),
    )
    before = None if previous is None else previous.model_version
    _record(cur, action, new.model_version, before, actor, reason, details)


def _numbers(cur: psycopg2.extensions.cursor, version: int, method: str, rule: PromotionRule) -> dict[str, Any]:
    cur.execute(
        "SELECT task, value FROM ops.model_evaluation "
        "WHERE model_version = %s AND split = %s AND method = %s AND metric = %s",
        (version, rule.split, method, rule.metric),
    )
    return dict(cur.fetchall())


def _judge(
    cur: psycopg2.extensions.cursor, candidate: ModelVersion, current: ModelVersion | None, rule: PromotionRule
) -> Decision:
    name = METRIC_NAMES[rule.metric]
    mine = _numbers(cur, candidate.model_version, "model", rule)
    if not _present(mine):
        return Decision(
            False,
            f"not evaluated: v{candidate.model_version} has no {rule.split} {name} (run evaluate first)",
            {"metric": rule.metric, "split": rule.split, "rule": asdict(rule)},
        )
    if current is None:
        return decide(mine, None, rule)
    theirs = _numbers(cur, candidate.model_version, "champion", rule)
    compared_to = candidate.metrics.get("champion_version")
    try:
        same = compared_to is not None and int(compared_to) == current.model_version
    except (TypeError, ValueError):
        same = False
    if not same or not _present(theirs):
        return Decision(
            False,
            f"not evaluated against the current champion v{current.model_version}: run evaluate again",
            {
                "metric": rule.metric,
                "split": rule.split,
                "rule": asdict(rule),
                "champion_version": current.model_version,
                "evaluated_against": compared_to,
            },
        )
    return decide(mine, theirs, rule, champion_version=current.model_version)


def promote(url: str, version: int, rule: PromotionRule = PromotionRule(), *, actor: str = "rule") -> Decision:
    """Apply the promotion rule to a candidate and act on it, in one transaction.

    Promoted: the champion is retired and the candidate becomes champion. Refused: the candidate stays a
    candidate with the reason as its ``status_reason``. Either way the decision is a row of
    ``ops.model_promotion``. Only a candidate can be promoted by the rule (ValueError otherwise; see
    ``force_promote``); LookupError for an unknown version.
    """
    with transaction(url) as conn, conn.cursor() as cur:
        _lock(cur)
        candidate = fetch_version(cur, version, lock=True)
        if candidate.status != "candidate":
            raise ValueError(
                f"model v{version} is {candidate.status}: only a candidate can be promoted by the rule "
                "(use a manual promotion to bring back a retired version)"
            )
        current = fetch_champion(cur, lock=True)
        decision = _judge(cur, candidate, current, rule)
        details = {**decision.details, "candidate_version": version}
        previous = current.model_version if current is not None else None
        if decision.promote:
            _crown(
                cur,
                candidate,
                current,
                action="promote",
                actor=actor,
                reason=decision.reason,
                status_reason=decision.reason,
                retired_reason=f"replaced by v{version} (promoted by {actor})",
                details=details,
            )
        else:
            cur.execute(
                "UPDATE ops.model_version SET status_reason = %s WHERE model_version = %s", (decision.reason, version)
            )
            _record(cur, "refuse", version, previous, actor, decision.reason, details)
    return Decision(decision.promote, decision.reason, details)


def _require(actor: str, reason: str) -> None:
    if not actor.strip():
        raise ValueError("say who is acting (actor)")
    if not reason.strip():
        raise ValueError("give a reason: it is recorded in ops.model_promotion")


def force_promote(url: str, version: int, *, actor: str, reason: str) -> ModelVersion:
    """Make a candidate or retired version the champion by hand, bypassing the rule (recorded as manual_promote)."""
    _require(actor, reason)
    with transaction(url) as conn, conn.cursor() as cur:
        _lock(cur)
        target = fetch_version(cur, version, lock=True)
        if target.status == "champion":
            raise ValueError(f"model v{version} is already the champion")
        current = fetch_champion(cur, lock=True)
        _crown(
            cur,
            target,
            current,
            action="manual_promote",
            actor=actor,
            reason=reason,
            status_reason=f"promoted manually by {actor}: {reason}",
            retired_reason=f"replaced by v{version} (promoted manually by {actor})",
            details={"status_before": target.status, "candidate_version": version},
        )
        return fetch_version(cur, version)


def rollback(url: str, *, actor: str, reason: str) -> ModelVersion:
    """Retire the champion and bring back the one it replaced; return the restored champion.

    The version brought back is the ``previous_champion`` of the latest promote, manual_promote or rollback
    that made the current champion champion (so rolling back twice undoes the first rollback). LookupError when
    there is no champion or it replaced none.
    """
    _require(actor, reason)
    with transaction(url) as conn, conn.cursor() as cur:
        _lock(cur)
        current = fetch_champion(cur, lock=True)
        if current is None:
            raise LookupError("there is no champion to roll back")
        cur.execute(
            """SELECT promotion_id, action, previous_champion FROM ops.model_promotion
               WHERE model_version = %s AND action IN ('promote', 'manual_promote', 'rollback')
               ORDER BY promotion_id DESC LIMIT 1""",
            (current.model_version,),
        )
        row = cur.fetchone()
        if row is None or row[2] is None:
            raise LookupError(
                f"champion v{current.model_version} replaced no earlier champion: nothing to roll back to "
                "(promote a version manually instead)"
            )
        promotion_id, action, previous = row
        target = fetch_version(cur, previous, lock=True)
        _crown(
            cur,
            target,
            current,
            action="rollback",
            actor=actor,
            reason=reason,
            status_reason=f"restored by rollback from v{current.model_version} ({actor}): {reason}",
            retired_reason=f"rolled back by {actor}: {reason}",
            details={"rolled_back": current.model_version, "restored": previous, "undoes_promotion": promotion_id,
                     "undone_action": action},
        )  # fmt: skip
        return fetch_version(cur, previous)


def history(url: str, version: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Recent ``ops.model_promotion`` rows, newest first (of one version's decisions when ``version`` is given)."""
    columns = ("promotion_id", "at", "action", "model_version", "previous_champion", "actor", "reason", "details")
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT {', '.join(columns)} FROM ops.model_promotion "
                "WHERE %s::integer IS NULL OR model_version = %s ORDER BY promotion_id DESC LIMIT %s",
                (version, version, limit),
            )
            return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()
