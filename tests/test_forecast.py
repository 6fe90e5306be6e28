"""Forecasting with the recurrent state: generation equals re-encoding, sampling rules, side streams that follow
the sequence grammar, the next-visit recall benchmark and its baseline, and the two commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from odyssey_batch.cli.forecast import register
from odyssey_batch.forecast.evaluate import (
    baseline_ranking,
    code_probabilities,
    concept_code,
    evaluate_forecast,
    last_visit_cut,
    model_ranking,
    recall_at_k,
    visit_codes,
    visit_tokens,
)
from odyssey_batch.forecast.generate import (
    INTERVAL_DAYS,
    TokenTable,
    _draw,
    _masked,
    _State,
    as_streams,
    generate,
    sample,
    score_next,
)
from odyssey_batch.forecast.render import concept_meaning, generated_rows, interval_meaning, token_meaning
from odyssey_batch.forecast.runs import load_pretrained
from odyssey_batch.sequences.grammar import TokenType
from odyssey_batch.sequences.tokens import window
from odyssey_batch.sequences.vocab import Vocabulary
from odyssey_batch.training.data import collate, load_sequences
from odyssey_batch.training.pretrain import PretrainOptions
from tests.conftest import pretrained_warehouse, run_sql

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def warehouse(pg_admin_url, template_db, tmp_path_factory):
    """100 synthetic patients, tokenized, and a tiny model pretrained for a few steps."""
    options = PretrainOptions(preset="tiny", max_length=MAX_LENGTH, batch_size=16, steps=12, lr=3e-3)
    with pretrained_warehouse(pg_admin_url, template_db, tmp_path_factory.mktemp("home"), 100, 21, options) as built:
        yield built


@pytest.fixture(scope="module")
def pretrained(warehouse):
    url, settings, run_id = warehouse
    return load_pretrained(url, settings, run_id)


@pytest.fixture(scope="module")
def history(pretrained):
    """A test patient's most recent window, ending after a visit's [REG]."""
    _, rows = load_sequences(pretrained.dataset, "test")
    streams = max(rows, key=lambda s: len(s["token_ids"]))
    return window(streams, len(streams["token_ids"]), MAX_LENGTH)


def _full_logits(model, streams) -> np.ndarray:
    batch, _ = collate([{k: np.array(v) for k, v in streams.items()}])
    with torch.no_grad():
        return model.logits(model(batch))[0].numpy()


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_recurrent_steps_equal_the_full_forward(pretrained, history, temperature):
    vocabulary = pretrained.dataset.vocabulary
    steps = 40
    generated, logits = generate(
        pretrained.model, history, vocabulary, steps=steps, temperature=temperature, seed=5, return_logits=True
    )
    assert len(generated) == steps and logits.shape == (steps, len(vocabulary))
    full = _full_logits(pretrained.model, as_streams(history, generated))
    at = np.arange(len(history["token_ids"]) - 1, len(history["token_ids"]) - 1 + steps)  # predicting each token
    np.testing.assert_allclose(logits, full[at], atol=1e-4, rtol=0)
    assert (logits.argmax(-1) == full[at].argmax(-1)).all()
    if temperature:  # the sampled path crosses visits: time jumps, new visit orders and segments are re-encoded too
        types = {g.type_id for g in generated}
        assert TokenType.INTERVAL in types and TokenType.VS in types


def test_seeded_sampling_is_deterministic(pretrained, history):
    model, vocabulary = pretrained.model, pretrained.dataset.vocabulary
    first = generate(model, history, vocabulary, steps=30, top_p=0.9, seed=11)
    assert generate(model, history, vocabulary, steps=30, top_p=0.9, seed=11) == first
    assert generate(model, history, vocabulary, steps=30, top_p=0.9, seed=12) != first
    batch, _, _ = sample(model, history, vocabulary, steps=30, rows=3, top_p=0.9, seed=11)
    again, _, _ = sample(model, history, vocabulary, steps=30, rows=3, top_p=0.9, seed=11)
    assert batch == again and len({tuple(g.token_id for g in row) for row in batch}) > 1


def test_greedy_and_a_tiny_nucleus_take_the_most_likely_token(pretrained, history):
    model, vocabulary = pretrained.model, pretrained.dataset.vocabulary
    table = TokenTable(vocabulary)
    greedy, logits = generate(model, history, vocabulary, steps=25, temperature=0, return_logits=True)
    masked = np.where(table.allowed, logits, -np.inf)
    assert [g.token_id for g in greedy] == masked.argmax(-1).tolist()
    for g, row in zip(greedy, masked, strict=True):  # the reported probability is the model's, at temperature 1
        expected = np.exp(row[g.token_id] - np.logaddexp.reduce(row[table.allowed]))
        assert g.probability == pytest.approx(expected, rel=1e-4)
    assert generate(model, history, vocabulary, steps=25, top_p=1e-6, seed=3) == greedy
    assert generate(model, history, vocabulary, steps=25, temperature=0.7, top_p=0.0, seed=4) == greedy
    # the next-token distribution of score_next is the first step's
    probabilities = score_next(model, history, vocabulary)
    assert probabilities.sum() == pytest.approx(1.0) and probabilities[~table.allowed].max() == 0
    assert int(probabilities.argmax()) == greedy[0].token_id


def test_pad_unk_mask_cls_and_task_tokens_are_never_sampled(pretrained, history):
    vocabulary = pretrained.dataset.vocabulary
    table = TokenTable(vocabulary)
    never = [i for i, t in enumerate(vocabulary.tokens) if t in ("[PAD]", "[UNK]", "[MASK]", "[CLS]")]
    never += [i for i, t in enumerate(vocabulary.tokens) if t.startswith("[TASK:")]
    assert len(never) == 4 + 6 and not table.allowed[never].any() and table.allowed.sum() == len(vocabulary) - 10
    rows, _, _ = sample(pretrained.model, history, vocabulary, steps=40, rows=50, temperature=3.0, seed=1)
    drawn = {g.token_id for row in rows for g in row}
    assert len(drawn) > 50 and not drawn & set(never)
    # even when the forbidden tokens are by far the most likely
    logits = torch.zeros(200, len(vocabulary))
    logits[:, never] = 50.0
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in ((1.0, 1.0), (5.0, 0.5), (0.0, 1.0)):
        chosen = _draw(_masked(logits, table), temperature, top_p, generator)
        assert not set(chosen.tolist()) & set(never)


# --------------------------------------------------------------------------------------------- side streams
def test_side_streams_follow_the_grammar():
    vocabulary = Vocabulary.build({"cond:ICD10CM:I10": 5, "lab:LOINC:2160-0:q*": 5}, {"LOINC:2160-0": 5}, ["los_7d"])
    table = TokenTable(vocabulary)
    history = {  # [CLS] [VS] cond [VE] [REG] of visit 1 at day 1000, age 50
        "token_ids": vocabulary.encode(["[CLS]", "[VS]", "cond:ICD10CM:I10", "[VE]", "[REG]"]),
        "ages": np.full(5, 50.0, dtype=np.float32),
        "times": np.array([1000.0, 1000.0, 1000.2, 1000.5, 1000.5]),
        "visit_orders": np.array([0, 1, 1, 1, 1]),
        "visit_segments": np.array([0, 1, 1, 1, 1]),
    }
    state = _State(history)
    tokens = ["[W_2]", "[VS]", "lab:LOINC:2160-0:q3", "[VE]", "[REG]", "[M_3]", "[VS]", "[VE]", "[REG]", "[LT]", "[VS]"]
    out = [state.advance(vocabulary.encode([t]), table) for t in tokens]
    col = {name: [float(o[name][0]) for o in out] for name in out[0]}
    days = [1014.5] * 5 + [1104.5] * 4 + [1470.5] * 2  # W_2: 14 days; the [VS] after it at the same time
    assert col["times"] == days
    assert col["visit_orders"] == [1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4]  # the interval carries the visit before it
    assert col["visit_segments"] == [0, 2, 2, 2, 2, 0, 1, 1, 1, 0, 2]
    assert col["type_ids"] == [TokenType.INTERVAL, TokenType.VS, TokenType.LAB, TokenType.VE, TokenType.REG,
                               TokenType.INTERVAL, TokenType.VS, TokenType.VE, TokenType.REG, TokenType.INTERVAL,
                               TokenType.VS]  # fmt: skip
    np.testing.assert_allclose(col["ages"], 50 + (np.array(days) - 1000.5) / 365.25, atol=1e-4)
    assert INTERVAL_DAYS["[W_2]"] == 14 and INTERVAL_DAYS["[M_0]"] == 28 and INTERVAL_DAYS["[M_3]"] == 90
    # unknown birth (ages all 0) stays 0
    state = _State({**history, "ages": np.zeros(5, dtype=np.float32)})
    assert state.advance(vocabulary.encode(["[LT]"]), table)["ages"][0] == 0


def test_generated_streams_are_consistent(pretrained, history):
    vocabulary = pretrained.dataset.vocabulary
    table = TokenTable(vocabulary)
    rows, _, _ = sample(pretrained.model, history, vocabulary, steps=40, rows=8, seed=2)
    last_order = int(history["visit_orders"][history["visit_orders"] > 0][-1])
    for row in rows:
        time, order, age = float(history["times"][-1]), last_order, float(history["ages"][-1])
        for g in row:
            assert g.type_id == table.types[g.token_id] and g.token == vocabulary.tokens[g.token_id]
            gap = INTERVAL_DAYS.get(g.token, 0.0)
            assert g.time_days == pytest.approx(time + gap)
            assert g.age == pytest.approx(age + gap / 365.25, abs=1e-4)
            order += g.token == "[VS]"
            assert g.visit_order == order
            assert g.visit_segment == (0 if g.type_id == TokenType.INTERVAL else (order - 1) % 2 + 1)
            time, age = g.time_days, g.age


def test_stop_at_visit_end_and_a_known_visit_start(pretrained, history):
    vocabulary = pretrained.dataset.vocabulary
    rows, _, first = sample(pretrained.model, history, vocabulary, steps=200, rows=6, seed=9, stop_at_visit_end=True,
                            prefix=(vocabulary.id("[VS]"),))  # fmt: skip
    ended = [row for row in rows if row[-1].token == "[VE]"]
    assert ended and all("[VE]" not in [g.token for g in row[:-1]] for row in rows)
    opened = int(history["visit_orders"].max()) + 1  # the known [VS] opened the next visit
    for row in rows:
        for g in row:
            if g.token == "[VS]":
                break
            assert g.visit_order == opened
    with_vs = {k: np.append(v, v[-1]) for k, v in history.items()}  # the same [VS], encoded in the history
    with_vs["token_ids"][-1], with_vs["type_ids"][-1] = vocabulary.id("[VS]"), TokenType.VS
    with_vs["visit_orders"][-1] += 1
    with_vs["visit_segments"][-1] = (with_vs["visit_orders"][-1] - 1) % 2 + 1
    np.testing.assert_allclose(first, score_next(pretrained.model, with_vs, vocabulary), atol=1e-5)


# ------------------------------------------------------------------------------------------------ benchmark
def test_ranking_and_recall_helpers_on_a_hand_built_sequence():
    tokens = ["[CLS]", "[VS]", "cond:ICD10CM:I10", "lab:LOINC:2160-0:q1", "[VE]", "[REG]", "[M_1]",
              "[VS]", "med:RXNORM:1", "lab:LOINC:2160-0:q4", "lab:LOINC:2160-0:q3", "[UNK]", "[VE]", "[REG]", "[W_0]",
              "[VS]", "proc:SNOMED:7", "med:RXNORM:1", "cond:ICD10CM:I10", "[VE]", "[REG]", "[W_1]",
              "[VS]", "cond:ICD10CM:I10", "lab:LOINC:2160-0:q2", "cond:ICD10CM:E11", "[UNK]", "[VE]", "[REG]",
    ]  # fmt: skip
    ids = np.array([4 if t == "[VS]" else 9 for t in tokens])
    cut = last_visit_cut(ids)
    assert cut == 22 and tokens[cut - 1] == "[W_1]" and last_visit_cut(ids[:7]) is None
    truth = visit_codes(visit_tokens(tokens, cut))
    assert truth == {"cond:ICD10CM:I10", "lab:LOINC:2160-0", "cond:ICD10CM:E11"}  # bins and [UNK] are not codes
    assert concept_code("lab:LOINC:2160-0:q4") == "lab:LOINC:2160-0" and concept_code("[UNK]") is None
    assert concept_code("lab:LOINC:72166-2") == "lab:LOINC:72166-2" and concept_code("[TASK:los_7d]") is None
    # frequency first (creatinine 3, in any bin), then recency: I10 (last at 18) before RXNORM:1 (17); SNOMED:7 once
    own = baseline_ranking(tokens[:cut])
    assert own == ["lab:LOINC:2160-0", "cond:ICD10CM:I10", "med:RXNORM:1", "proc:SNOMED:7"]
    # by hand: top 1 {creatinine} finds 1 of 3 true codes; top 2 adds I10; E11 was never seen before
    assert recall_at_k(own, truth, 1) == pytest.approx(1 / 3)
    assert recall_at_k(own, truth, 2) == pytest.approx(2 / 3)
    assert recall_at_k(own, truth, 3) == pytest.approx(2 / 3)
    assert recall_at_k(own, truth, 20) == pytest.approx(2 / 3)
    # model: codes by the number of samples containing them, ties by the first step's probability
    samples = [["cond:ICD10CM:E11", "cond:ICD10CM:E11", "[VE]"], ["med:RXNORM:1", "cond:ICD10CM:E11"], ["[VE]"]]
    first = {"cond:ICD10CM:I10": 0.2, "med:RXNORM:1": 0.1, "lab:LOINC:2160-0": 0.3, "proc:SNOMED:7": 0.0}
    ranked = model_ranking(samples, first)
    assert ranked == ["cond:ICD10CM:E11", "med:RXNORM:1", "lab:LOINC:2160-0", "cond:ICD10CM:I10", "proc:SNOMED:7"]
    assert recall_at_k(ranked, truth, 3) == pytest.approx(2 / 3) and recall_at_k(ranked, truth, 4) == 1.0
    probabilities = np.array([0.1, 0.2, 0.3, 0.4])
    assert code_probabilities(probabilities, ["[VS]", "lab:L:1:q0", "lab:L:1:q1", "cond:X:1"]) == pytest.approx(
        {"lab:L:1": 0.5, "cond:X:1": 0.4}
    )
    with pytest.raises(ValueError):
        recall_at_k(own, set(), 5)


def test_evaluate_forecast_on_a_tiny_warehouse(warehouse):
    url, settings, run_id = warehouse
    result = evaluate_forecast(url, settings, None, k=(1, 5, 10, 20), max_patients=200, samples=4, seed=0)
    assert result["pretrain_run"] == run_id and result["patients"] > 5 and result["k"] == [1, 5, 10, 20]
    for method in ("model", "baseline"):
        values = [result[method][f"recall@{k}"] for k in (1, 5, 10, 20)]
        assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values), (method, values)
    assert result["baseline"]["recall@20"] > 0.5  # patients repeat their codes
    print("forecast recall:", json.dumps({"model": result["model"], "baseline": result["baseline"]}))
    small = evaluate_forecast(url, settings, run_id, k=(5,), max_patients=3, samples=2, seed=7)
    assert small["patients"] == 3
    assert (
        evaluate_forecast(url, settings, run_id, k=(5,), max_patients=3, samples=2, seed=7)["model"] == small["model"]
    )


# ------------------------------------------------------------------------------------------------ rendering
def test_meanings_for_readers():
    displays = {"cond:ICD10CM:I10": "Essential hypertension", "lab:LOINC:2160-0": "Creatinine"}
    assert concept_meaning("cond:ICD10CM:I10", displays) == "diagnosis ICD10CM:I10 (Essential hypertension)"
    assert concept_meaning("med:RXNORM:1", displays) == "medication RXNORM:1"
    assert concept_meaning("lab:LOINC:2160-0:q3", displays) == "result LOINC:2160-0 (Creatinine) bin 4"
    assert interval_meaning("[W_2]") == "next visit 14–20 days later"
    assert interval_meaning("[M_0]") == "next visit 28–29 days later"
    assert interval_meaning("[M_12]") == "next visit 360–365 days later"
    assert token_meaning("[VS]", 3, {}) == "visit 3 starts" and token_meaning("[LT]", 3, {}).endswith("a year later")
    assert token_meaning("[UNK]", 1, {}) == "a code outside the vocabulary"


# ---------------------------------------------------------------------------------------------- the commands
@pytest.fixture(scope="module")
def cli(warehouse):
    url, settings, _ = warehouse
    app = typer.Typer()
    register(app)
    env = {"ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(settings.home), "COLUMNS": "200"}

    def invoke(*args: str):
        return CliRunner().invoke(app, list(args), env=env)

    return invoke


def test_forecast_command(cli, warehouse):
    url, _, run_id = warehouse
    patient = run_sql(url, "SELECT patient_id FROM ehr.patient ORDER BY patient_id LIMIT 1")[0][0]
    result = cli("forecast", patient, "--steps", "12", "--history", "5", "--seed", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["pretrain_run"] == run_id and data["steps"] == 12 and patient not in result.output
    assert len(data["history"]) == 5 and not any(r["generated"] for r in data["history"])
    assert len(data["generated"]) == 12 and all(0 < r["probability"] <= 1 for r in data["generated"])
    assert data["history"][-1]["visit"] <= data["generated"][-1]["visit"]
    again = cli("forecast", patient, "--steps", "12", "--history", "5", "--seed", "1", "--json")
    assert json.loads(again.output) == data
    human = cli("forecast", patient, "--steps", "8", "--temperature", "0", "--run", str(run_id))
    assert human.exit_code == 0, human.output
    assert "forecast" in human.output and "meaning" in human.output and patient not in human.output
    missing = cli("forecast", "no-such-patient", "--steps", "3")
    assert missing.exit_code == 2 and "no patient" in missing.output
    assert cli("forecast", patient, "--run", "999").exit_code == 2
    assert "temperature" in cli("forecast", "--help").output


def test_evaluate_forecast_command(cli):
    result = cli("evaluate-forecast", "--k", "1,5", "--max-patients", "3", "--samples", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["patients"] == 3 and set(data["model"]) == set(data["baseline"]) == {"recall@1", "recall@5"}
    human = cli("evaluate-forecast", "--k", "5", "--max-patients", "2", "--samples", "2")
    assert human.exit_code == 0 and "baseline" in human.output and "recall@5" in human.output
    assert cli("evaluate-forecast", "--k", "0,x").exit_code == 2
    assert "recall@k" in cli("evaluate-forecast", "--help").output


def test_generated_rows_renumber_visits(pretrained, history):
    generated = generate(pretrained.model, history, pretrained.dataset.vocabulary, steps=10, seed=0)
    rows = generated_rows(generated, {}, pretrained.dataset.bins, visit_offset=7)
    assert [r.visit for r in rows] == [g.visit_order + 7 for g in generated]
    assert all(r.generated and len(r.date) == 10 for r in rows)
