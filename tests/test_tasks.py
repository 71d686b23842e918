"""Task runner, lm-eval-compatible scoring, answer normalisation, verdicts, spec errors, shipped specs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hiercomp.errors import HiercompError
from hiercomp.tasks import (
    compare_to_reference,
    difference_interval,
    disagreements,
    load_examples,
    load_spec,
    probe_verdicts,
    resolve_spec,
    run_tasks,
    shipped_names,
    verdict,
)
from hiercomp.tasks.generation import contains, exact_match, f1, greedy_generate, normalise_answer, token_f1
from hiercomp.tasks.multiple_choice import encode_pair, predictions, score_choices, score_question
from tests.conftest import SHARED_DATA, STORIES, needs_shared

TASK_DATA = SHARED_DATA / "tasks"


pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    """BOS + one token per UTF-8 byte (id = byte + 3); enough of the HF tokenizer interface for the runner."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([1] if add_special_tokens else []) + [b + 3 for b in text.encode()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval(), ByteTokenizer()


def direct_loglikelihood(model, ids: list[int], n_continuation: int) -> float:
    """Σ log P over the last n_continuation tokens, from one plain forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = F.log_softmax(logits, dim=-1)
    start = len(ids) - n_continuation
    return sum(log_probs[i - 1, ids[i]].item() for i in range(start, len(ids)))


def write_task(tmp_path: Path, spec_text: str, rows: list[dict]) -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tmp_path / "task.yaml"
    spec.write_text(spec_text)
    return spec


MC_SPEC = """name: toy
kind: multiple_choice
data: data.jsonl
template: "Q: {q}\\nA:"
choices: {fields: [a, b, c]}
gold: label
"""
MC_ROWS = [{"q": "sky colour", "a": "blue", "b": "green grass", "c": "red", "label": 0},
           {"q": "two plus two", "a": "four", "b": "five", "c": "twenty two", "label": 2}]


# --- log-likelihood scoring reproduces a hand computation -------------------------------------------------------

def test_scores_match_direct_forward_pass(tiny):
    model, tok = tiny
    context, choices = "Q: sky colour\nA:", (" blue", " green grass", " red")
    scores = score_question(model, tok, context, tuple(c.strip() for c in choices), " ", max_length=64)
    for choice, ll in zip(choices, scores.loglikelihoods):
        whole = tok(context + choice)["input_ids"]
        expected = direct_loglikelihood(model, whole, len(choice.encode()))
        assert ll == pytest.approx(expected, abs=1e-4)
    assert not scores.truncated


def test_cached_prefix_equals_uncached_fallback(tiny):
    model, _ = tiny

    class NoCache(torch.nn.Module):  # hides the KV cache so score_choices takes the full-batch path
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, **kwargs):
            return type("Out", (), {"logits": self.inner(input_ids=input_ids).logits})()

    ctx, conts = [1, 50, 60, 70], [[80, 90, 100], [81], [82, 83]]
    cached = score_choices(model, ctx, conts, 64)
    plain = score_choices(NoCache(model), ctx, conts, 64)
    assert np.allclose(cached.loglikelihoods, plain.loglikelihoods, atol=1e-4)
    assert cached.greedy == plain.greedy


def test_runner_accuracy_from_hand_scores(tiny, tmp_path):
    model, tok = tiny
    spec = write_task(tmp_path, MC_SPEC, MC_ROWS)
    result = run_tasks(model, tok, [spec], progress=False)["toy"]
    hits, hits_norm = 0, 0
    for row in MC_ROWS:
        context, choices = f"Q: {row['q']}\nA:", [row["a"], row["b"], row["c"]]
        lls = [direct_loglikelihood(model, tok(context + " " + c)["input_ids"], len((" " + c).encode()))
               for c in choices]
        hits += int(np.argmax(lls)) == row["label"]
        hits_norm += int(np.argmax(np.array(lls) / [len(c) for c in choices])) == row["label"]
    items = result.pop("items")  # each question's score, for the paired verdicts
    assert result == {"acc": hits / 2, "acc_norm": hits_norm / 2, "n": 2, "truncated": 0}
    assert sum(items["acc"]) == hits and sum(items["acc_norm"]) == hits_norm and len(items["acc"]) == 2


def test_long_prompt_is_truncated_and_counted(tiny, tmp_path):
    model, tok = tiny  # 64 positions
    rows = [{"q": "x" * 100, "a": "yes", "b": "no", "c": "maybe", "label": 1}, MC_ROWS[0]]
    spec = write_task(tmp_path, MC_SPEC, rows)
    assert run_tasks(model, tok, [spec], progress=False)["toy"]["truncated"] == 1
    completion, cut = greedy_generate(model, tok, "y" * 100, max_new_tokens=5, stop=["\n"], max_length=64)
    assert cut and len(completion.encode()) <= 5 * 4


# --- lm-eval's definitions ---------------------------------------------------------------------------------------

def test_acc_norm_is_loglikelihood_per_character():
    # lm-eval: pred = argmax(lls); pred_norm = argmax(lls / [len(choice) for choice in choices]).
    assert predictions([-10.0, -12.0], ("ab", "abcdef")) == (0, 1)  # -5 vs -2 per character
    assert predictions([-6.0, -6.0], ("abc", "abc")) == (0, 0)  # ties go to the lower index (numpy argmax)
    assert predictions([-3.0, -9.0, -8.0], ("a", "bbbbbbbb", "cccc")) == (0, 1)  # -3, -1.125, -2


def test_encode_pair_moves_trailing_space_to_continuation():
    tok = ByteTokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok("Answer:")["input_ids"] and cont == [b + 3 for b in b" yes"]


# --- SQuAD answer normalisation and metrics ----------------------------------------------------------------------

def test_squad_normalisation_and_metrics():
    assert normalise_answer("  The Cat,  sat!  ") == "cat sat"
    assert normalise_answer("An apple a day") == "apple day"
    assert normalise_answer("The Cat", "lower") == "the cat" and normalise_answer(" A! ", "none") == "A!"
    assert exact_match("the Eiffel tower.", ["Eiffel Tower", "tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert token_f1("the cat sat", "cat on mat") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))  # 0.4
    assert f1("cat sat", ["dog", "cat on mat", "sat cat"]) == 1.0
    assert token_f1("", "") == 1.0 and token_f1("the", "cat") == 0.0
    assert contains("it was in December 1972, I think", ["december 1972"]) == 1.0
    assert contains("nothing", ["the"]) == 0.0  # an answer that normalises to nothing never matches


# --- verdicts ----------------------------------------------------------------------------------------------------

def test_verdict_uses_five_percent_relative_band():
    assert verdict(0.50, 0.48) == "matches"  # 4% below
    assert verdict(0.50, 0.47) == "worse"  # 6% below
    assert verdict(0.50, 0.53) == "better"
    assert verdict(0.50, 0.475) == "matches"  # exactly 5%
    assert verdict(6.0, 6.2, higher_is_better=False) == "matches"  # perplexity +3.3%
    assert verdict(6.0, 6.5, higher_is_better=False) == "worse"
    assert verdict(6.0, 5.0, higher_is_better=False) == "better"
    assert verdict(0.0, 0.0) == "matches" and verdict(0.0, 0.01) == "better"
    assert verdict(0.2, 0.0) == "worse"


def test_disagreements_and_probes_on_constructed_results():
    reference = {"squad": {"f1": 0.60, "contains": 0.70, "n": 100}, "squad_closed_book": {"f1": 0.20, "n": 100},
                 "nq_open": {"f1": 0.10, "n": 100}}
    hidden = {"perplexity": 6.1, "reference_perplexity": 6.0,
              "tasks": {"squad": {"f1": 0.59, "contains": 0.71, "n": 100},
                        "squad_closed_book": {"f1": 0.10, "n": 100}, "nq_open": {"f1": 0.10, "n": 100}}}
    out = compare_to_reference(hidden, reference)
    assert out["verdicts"]["perplexity"] == "matches"
    assert out["verdicts"]["squad_closed_book"] == {"f1": "worse"}
    assert out["probes"] == {"closed_book": "worse", "open_book": "matches", "in_context_retrieval": "matches"}
    assert len(out["disagreements"]) == 1 and "squad_closed_book f1" in out["disagreements"][0]
    assert "0.100 vs 0.200" in out["disagreements"][0]

    noisy = {"perplexity": 9.0, "reference_perplexity": 6.0, "tasks": reference}
    out = compare_to_reference(noisy, reference)
    assert out["verdicts"]["perplexity"] == "worse"
    assert len(out["disagreements"]) == 1 and "hold up" in out["disagreements"][0]
    agree = {"perplexity": "worse", "squad": {"f1": "worse"}}
    assert disagreements(agree) == [] and probe_verdicts(agree) == {"open_book": "worse"}


def test_a_difference_inside_its_interval_is_within_noise_not_worse():
    """30 near-chance questions: 0.60 -> 0.50 is beyond 5% but its paired 95% interval includes 0."""
    rng = np.random.default_rng(1)
    original_items = (rng.random(30) < 0.6).astype(float)
    flipped = original_items.copy()
    flipped[np.flatnonzero(original_items)[:3]] = 0.0  # three right answers become wrong
    original = {"acc": original_items.mean(), "n": 30, "items": {"acc": original_items.tolist()}}
    compressed = {"acc": flipped.mean(), "n": 30, "items": {"acc": flipped.tolist()}}
    low, high = difference_interval(original, compressed, "acc")
    assert low < 0 <= high and math.isclose(compressed["acc"] - original["acc"], -0.1)
    out = compare_to_reference({"tasks": {"piqa": compressed}}, {"piqa": original})
    assert out["verdicts"]["piqa"] == {"acc": "within noise"} and out["intervals"]["piqa"]["acc"] == [low, high]
    # The same drop on 3000 questions (paired, 300 flipped) is real: worse.
    big_items = np.tile(original_items, 100)
    big_flipped = np.tile(flipped, 100)
    big = compare_to_reference({"tasks": {"piqa": {"acc": big_flipped.mean(), "n": 3000,
                                                   "items": {"acc": big_flipped.tolist()}}}},
                               {"piqa": {"acc": big_items.mean(), "n": 3000, "items": {"acc": big_items.tolist()}}})
    assert big["verdicts"]["piqa"] == {"acc": "worse"} and big["intervals"]["piqa"]["acc"][1] < 0
    # Without per-question scores (an lm-eval or older result) the interval is unpaired, from n: still noise.
    bare = {k: v for k, v in compressed.items() if k != "items"}
    assert compare_to_reference({"tasks": {"piqa": bare}}, {"piqa": original})["verdicts"]["piqa"]["acc"] == \
        "within noise"
    # A probe with a noisy metric is no better than "within noise"; "worse" still wins.
    assert probe_verdicts({"squad": {"f1": "matches", "contains": "within noise"}}) == {
        "open_book": "matches", "in_context_retrieval": "within noise"}


def test_eval_prints_intervals_and_probe_verdicts_on_the_console():
    from hiercomp.cli.eval import _task_lines

    result = {"tasks": {"squad": {"f1": 0.5, "n": 30}}, "reference_tasks": {"squad": {"f1": 0.6, "n": 30}},
              "verdicts": {"perplexity": "matches", "squad": {"f1": "within noise"}},
              "intervals": {"squad": {"f1": [-0.25, 0.05]}},
              "probes": {"open_book": "within noise"}}
    text = "\n".join(_task_lines(result))
    assert "diff -0.1000 [-0.250, +0.050]  within noise" in text
    assert "probe open_book" in text and text.count("within noise") >= 2


# --- bad specs and data: one line naming the spec file and line --------------------------------------------------

def one_line_error(spec: Path, call) -> str:
    with pytest.raises(HiercompError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("spec_text, rows, line, words", [
    (MC_SPEC.replace('template: "Q: {q}\\nA:"\n', ""), MC_ROWS, 1, "missing field 'template'"),
    (MC_SPEC.replace("{q}", "{question}"), MC_ROWS, 4, "template names field 'question'"),
    (MC_SPEC, [MC_ROWS[0], {"q": "x", "a": "1", "c": "3", "label": 0}], 5, "row 2 of"),
    (MC_SPEC, [MC_ROWS[0], {**MC_ROWS[1], "label": 3}], 6, "not among its 3 choices"),
    (MC_SPEC.replace("multiple_choice", "ranking"), MC_ROWS, 2, "kind must be one of"),
    (MC_SPEC + "metrics: [f1]\n", MC_ROWS, 7, "does not apply to multiple_choice"),
    (MC_SPEC.replace("gold: label", "gold: [label"), MC_ROWS, 7, "not valid YAML"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, spec_text, rows, line, words):
    spec = write_task(tmp_path, spec_text, rows)
    message = one_line_error(spec, lambda: load_examples(load_spec(spec)))
    assert message.startswith(f"{spec}:{line}: "), message
    assert words in message
    if "row 2" in words:
        assert str(tmp_path / "data.jsonl") in message


def test_missing_data_file_names_the_options(tmp_path):
    spec = tmp_path / "task.yaml"
    spec.write_text(MC_SPEC)
    message = one_line_error(spec, lambda: load_examples(load_spec(spec)))
    assert message.startswith(f"{spec}:3: ") and "--data-dir" in message and "HIERCOMP_DATA_DIR" in message


# --- shipped specs against the real data -------------------------------------------------------------------------

@needs_shared
def test_shipped_specs_validate_against_real_data():
    assert {"arc_easy", "piqa", "boolq", "copa", "lambada", "squad", "nq_open"} <= set(shipped_names())
    for name in shipped_names():
        spec = resolve_spec(name)
        examples = load_examples(spec, TASK_DATA, limit=3)  # checks every row of the file, renders 3
        assert len(examples) == 3
        for example in examples:
            assert example.context and "{" not in spec.template.format_map(_Blank())
            if spec.kind == "multiple_choice":
                assert 0 <= example.gold < len(example.choices)
            else:
                assert example.answers


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


@needs_shared
def test_stories260k_runs_shipped_tasks_via_env(monkeypatch):
    from hiercomp.io.hf import load_hf_model

    monkeypatch.setenv("HIERCOMP_DATA_DIR", str(TASK_DATA))
    loaded = load_hf_model(STORIES)
    results = run_tasks(loaded.model, loaded.tokenizer, ["copa", "lambada", "squad"], limit=3, progress=False)
    assert results["copa"]["n"] == 3 and 0 <= results["copa"]["acc"] <= 1
    assert set(results["squad"]) == {"exact_match", "f1", "contains", "n", "truncated", "items"}
    again = run_tasks(loaded.model, loaded.tokenizer, ["copa", "lambada", "squad"], limit=3, progress=False)
    assert again == results  # deterministic


@needs_shared
def test_open_book_prompt_splits_after_the_passage_into_the_same_tokens():
    """squad's examples know where the passage ends; split there, the prompt is the same tokens, the passage's
    first, and a full cache read in two forwards answers exactly as in one."""
    from hiercomp.io.hf import load_hf_model
    from hiercomp.tasks.generation import split_tokens

    examples = load_examples(resolve_spec("squad"), TASK_DATA, limit=3)
    rows = [json.loads(line) for line in (TASK_DATA / "squad_validation_olmes1000.jsonl").open() if line.strip()][:3]
    assert all(e.context[: e.question_at].endswith(r["context"]) and e.context[e.question_at:].startswith("\nQuestion:")
               for e, r in zip(examples, rows))
    assert all(e.question_at is None for e in load_examples(resolve_spec("squad_closed_book"), TASK_DATA, limit=2))
    loaded = load_hf_model(STORIES)
    for example in examples:
        ids, before = split_tokens(loaded.tokenizer, example.context, example.question_at)
        assert ids == list(loaded.tokenizer(example.context)["input_ids"]) and 0 < before < len(ids)
        assert loaded.tokenizer.decode(ids[before:]).lstrip().startswith("Question")
        whole = greedy_generate(loaded.model, loaded.tokenizer, example.context, 16, ["\n"], None)
        split = greedy_generate(loaded.model, loaded.tokenizer, example.context, 16, ["\n"], None,
                                split_at=example.question_at)
        assert split == whole


@needs_shared
def test_cli_eval_tasks_json_with_verdicts(tmp_path):
    from hiercomp.cli import main

    out = tmp_path / "result.json"
    code = main(["eval", str(STORIES), "--tasks", "copa", "--tasks", "piqa", "--limit", "3", "--data-dir",
                 str(TASK_DATA), "--kl-against", str(STORIES), "--quiet", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"copa", "piqa"} and result["tasks"]["piqa"]["n"] == 3
    assert result["verdicts"] == {"copa": {"acc": "matches"}, "piqa": {"acc": "matches", "acc_norm": "matches"}}
    assert result["disagreements"] == []


# --- lm-evaluation-harness bridge --------------------------------------------------------------------------------

LM_EVAL_TASK = """task: local_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@needs_shared
def test_lm_eval_bridge_matches_our_runner_offline(tmp_path, monkeypatch):
    from hiercomp.io.hf import load_hf_model
    from hiercomp.tasks.lm_eval_bridge import lm_eval_available, run_lm_eval

    # Skip only when the harness is genuinely absent; an install that is present but broken (a missing
    # dependency such as accelerate) must fail here, not hide behind a skip.
    if not lm_eval_available():
        pytest.skip("lm_eval is not installed (pip install 'hiercomp[lm-eval]'): the bridge cannot be tested")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = (TASK_DATA / "piqa_validation.jsonl").read_text().splitlines()[:12]
    (tmp_path / "piqa12.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "local_piqa.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "piqa12.jsonl"))
    loaded = load_hf_model(STORIES)
    theirs = run_lm_eval(loaded.model, loaded.tokenizer, "local_piqa", include_path=tmp_path,
                         include_defaults=False)["local_piqa"]
    ours = run_tasks(loaded.model, loaded.tokenizer, ["piqa"], limit=12, data_dir=TASK_DATA, progress=False)["piqa"]
    assert theirs["n"] == 12
    assert math.isclose(theirs["acc"], ours["acc"]) and math.isclose(theirs["acc_norm"], ours["acc_norm"])


def test_broken_lm_eval_install_is_a_one_line_error(monkeypatch):
    """lm_eval present but its HF backend unimportable (the missing-accelerate case): an error, not a traceback."""
    from hiercomp.tasks.lm_eval_bridge import lm_eval_available, run_lm_eval

    if not lm_eval_available():
        pytest.skip("lm_eval is not installed: nothing to break")
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)  # import now raises ImportError
    with pytest.raises(HiercompError, match="installed but cannot load its Hugging Face backend.*pip install"):
        run_lm_eval(torch.nn.Linear(2, 2), None, "piqa")
