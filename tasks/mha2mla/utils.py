"""MHA2MLA Table 1's tasks as lighteval scored them for SmolLM, for lm-eval (tasks/mha2mla/*.yaml).

MHA2MLA (Ji et al. 2025) evaluated with lighteval and the SmolLM custom task file: zero-shot,
loglikelihood of each choice given the query, scored by `loglikelihood_acc_norm_nospace`. Each
task here builds the query and the choices exactly as those prompt functions do (the YAMLs set
`target_delimiter: ""`, so lm-eval scores `choice` right after `query`, and, like lighteval, moves
the query's trailing spaces into the continuation before tokenizing) and scores them the same way:

    acc               argmax_i  ll_i
    acc_norm_nospace  argmax_i  ll_i / chars_i,  chars_i = len(choice_i) - 1 if it starts with " "
                                                           else len(choice_i)

(lighteval's LogProbCharNorm(ignore_first_space=True): the leading space that separates the
choice from the query is not counted). tasks/README.md lists where lm-eval only approximates lighteval.
"""
from __future__ import annotations

import re


# --------------------------------------------------------------------------------- scoring
def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first maximum, like np.argmax


def nospace_chars(choice: str) -> int:
    """Characters that normalise a choice's loglikelihood (its separating leading space excluded)."""
    return len(choice) - 1 if choice.startswith(" ") else len(choice)


def score(choices: list[str], gold: int, results) -> dict:
    """acc and acc_norm_nospace of one document from lm-eval's (loglikelihood, is_greedy) pairs."""
    lls = [float(r[0]) for r in results]
    if len(lls) != len(choices):
        raise ValueError(f"{len(lls)} loglikelihoods for {len(choices)} choices")
    normed = [ll / nospace_chars(c) for ll, c in zip(lls, choices)]
    return {"acc": float(_argmax(lls) == gold), "acc_norm_nospace": float(_argmax(normed) == gold)}


def _results(choices_fn, gold_fn):
    def process_results(doc: dict, results) -> dict:
        return score(choices_fn(doc), gold_fn(doc), results)
    return process_results


# --------------------------------------------------------------------------------- prompts
# ARC (Easy, Challenge): lighteval `arc`.
def arc_text(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def arc_choices(doc: dict) -> list[str]:
    return [" " + text for text in doc["choices"]["text"]]


def arc_gold(doc: dict) -> int:
    return list(doc["choices"]["label"]).index(doc["answerKey"])


# OpenBookQA: lighteval `openbookqa` (the bare question stem).
def openbookqa_text(doc: dict) -> str:
    return doc["question_stem"]


def openbookqa_gold(doc: dict) -> int:
    return "ABCDE".index(doc["answerKey"].strip())


# PIQA: lighteval `piqa_harness`.
def piqa_text(doc: dict) -> str:
    return f"Question: {doc['goal']}\nAnswer:"


def piqa_choices(doc: dict) -> list[str]:
    return [" " + doc["sol1"], " " + doc["sol2"]]


def piqa_gold(doc: dict) -> int:
    return int(doc["label"])


# HellaSwag: the SmolLM task file's own prompt. Its query keeps a trailing space and every ending
# starts with one, so the scored continuation begins with two spaces (as in lighteval).
def _hellaswag_clean(text: str) -> str:
    text = text.replace(" [title]", ". ")  # WikiHow artefacts
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_text(doc: dict) -> str:
    return _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()} ")


def hellaswag_choices(doc: dict) -> list[str]:
    return [" " + _hellaswag_clean(ending) for ending in doc["endings"]]


def hellaswag_gold(doc: dict) -> int:
    return int(doc["label"])


# WinoGrande: lighteval `winogrande`: one query (the sentence up to the blank, trailing space
# kept) and the choices "<option> <rest of the sentence>", i.e. the option is scored too
# (lm-eval's stock task instead varies the context and scores only the rest).
def winogrande_text(doc: dict) -> str:
    return doc["sentence"].split("_")[0]


def winogrande_choices(doc: dict) -> list[str]:
    rest = doc["sentence"].split("_")[1].strip()
    return [f"{doc['option1']} {rest}", f"{doc['option2']} {rest}"]


def winogrande_gold(doc: dict) -> int:
    return int(doc["answer"]) - 1


# MMLU, cloze form (the SmolLM task file's `mmlu_cloze_prompt`): the answer text, not a letter.
def mmlu_text(doc: dict) -> str:
    topic = doc["subject"].replace("_", " ")
    return f"The following are questions about {topic}.\nQuestion: {doc['question']}\nAnswer:"


def mmlu_choices(doc: dict) -> list[str]:
    return [" " + c for c in doc["choices"]]


def mmlu_gold(doc: dict) -> int:
    return int(doc["answer"])


arc_results = _results(arc_choices, arc_gold)
openbookqa_results = _results(arc_choices, openbookqa_gold)  # same choices layout as ARC
piqa_results = _results(piqa_choices, piqa_gold)
hellaswag_results = _results(hellaswag_choices, hellaswag_gold)
winogrande_results = _results(winogrande_choices, winogrande_gold)
mmlu_results = _results(mmlu_choices, mmlu_gold)
