"""`metaspo bench --loglik`: `scoring: loglik` against generative scoring on multiple-choice questions.

The default suite's multiple-choice tasks, the first ``questions`` test questions of each, under one
system prompt (the default assistant prompt) and each task's initial user prompt. Each method scores
every question once, through the Scorer, on a fresh engine (no response cache, the recipe's batch size):

- ``generate``: the embedded recipe's base settings (greedy, its ``max_new_tokens``, stop at
  ``</answer>``), then the task's answer extraction;
- ``loglik``: the option X whose ``(X)`` is likeliest after the prompt (``search/scorer.py``), no generation.

Figures: questions per second of each; each one's accuracy (and chance, the mean of 1/options); and
their agreement, the fraction of questions where loglik's option is the one extracted from the
generated response (a response with no extractable option counts as a disagreement; agreement among
the questions where generation gave an option is reported too). ``variants`` scores other
continuations the same way (with the option's text; summed or per-token mean), to show which one
agrees best with generation. Run alone with ``python -m metaspo_hf.bench.loglik``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from statistics import fmean

import torch

from ..errors import MetaspoError
from ..models.base import LM, GenerationSettings, make_chat
from ..models.engine import HFEngine
from ..models.loading import ModelSpec, load_model
from ..recipe import load_recipe
from ..scoring import LOGLIK_CONTINUATION, Scorer, Trial, is_multiple_choice
from ..tasks import load_suite
from ..tasks.extract import LETTERS, extract_choice, find_answer_segment


@dataclass(frozen=True)
class Workload:
    suite: str = "bigbench-reasoning"
    # ~20 test questions per task: 100 on the default suite's five multiple-choice tasks.
    questions: int = 20
    system_prompt: str = "You are a helpful assistant."
    # The embedded recipe (recipes/smollm2-135m-cpu.yaml): base generation settings and engine batch.
    recipe: str = "smollm2-135m-cpu"
    threads: int = 2
    seed: int = 0


QUICK = Workload(questions=3)

# Continuations for an option (its letter and text), scored as (template, normalization): "sum" of the
# token log-probabilities, or their "mean" per token (length-normalized). All are scored in one engine
# call, so each question's tokens are computed once for all of them.
VARIANTS = {
    "tag_letter": ("<answer>{letter}</answer>", "sum"),
    "tag_letter_text_sum": ("<answer>({letter}) {option}</answer>", "sum"),
    "tag_letter_text_mean": ("<answer>({letter}) {option}</answer>", "mean"),
    "paren_letter": ("({letter})", "sum"),
    "paren_letter_text_sum": ("({letter}) {option}", "sum"),
    "paren_letter_text_mean": ("({letter}) {option}", "mean"),
    "text_mean": ("{option}", "mean"),
}


def run(model, tokenizer, workload: Workload = Workload(), tasks=None) -> dict:
    """Both methods (and the continuation variants) on ``tasks`` (default: the suite's multiple-choice
    tasks, ``workload.questions`` test questions each); every figure as a JSON-ready dict."""
    torch.set_num_threads(workload.threads)
    recipe = load_recipe(workload.recipe)
    spec = recipe.generation.base
    settings = GenerationSettings(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                  top_p=spec.top_p, stop=tuple(spec.stop), seed=workload.seed)
    tasks = _tasks(workload) if tasks is None else tasks
    trials = [Trial(workload.system_prompt, task.initial_prompt, task, task.test[:workload.questions]) for task in tasks]
    examples = [(trial.task, ex) for trial in trials for ex in trial.examples]

    def engine() -> HFEngine:
        return HFEngine(model, tokenizer, "bench", batch_size=recipe.model.batch_size, progress=False)

    # One question each way first, so that neither side pays one-time costs (allocations, kernels).
    warm = [Trial(workload.system_prompt, trials[0].user_prompt, trials[0].task, trials[0].examples[:1])]
    for scoring in ("generate", "loglik"):
        Scorer(LM(engine(), settings), scoring=scoring)(warm)

    figures, responses = {}, {}
    for scoring in ("generate", "loglik"):
        lm = LM(engine(), settings, scoring=scoring)
        print(f"[bench] loglik section: scoring {len(examples)} questions by {scoring}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        scores = Scorer(lm)(trials)
        wall = time.perf_counter() - started
        responses[scoring] = [r for score in scores for r in score.responses]
        correct = [s for score in scores for s in score.scores]
        stats = lm.engine.stats
        figures[scoring] = {"questions": len(examples), "wall_s": round(wall, 2),
                            "questions_per_s": round(len(examples) / wall, 2), "accuracy": round(fmean(correct), 3),
                            "prefill_tokens": stats.prefill_tokens, "generated_tokens": stats.generated_tokens,
                            "scored_continuations": stats.scored_continuations}

    generated = [_letter(r, ex) for r, (_, ex) in zip(responses["generate"], examples, strict=True)]
    chosen = [_letter(r, ex) for r, (_, ex) in zip(responses["loglik"], examples, strict=True)]
    figures["generate"]["with_option"] = round(fmean(g is not None for g in generated), 3)
    per_task = {}
    for trial in trials:
        picks = [(g, c, ex) for g, c, (task, ex) in zip(generated, chosen, examples, strict=True) if task is trial.task]
        per_task[trial.task.name] = {
            "questions": len(picks),
            "chance": round(fmean(1 / len(ex.options) for *_, ex in picks), 3),
            "generate_accuracy": round(fmean(_right(g, ex) for g, _, ex in picks), 3),
            "loglik_accuracy": round(fmean(_right(c, ex) for _, c, ex in picks), 3),
            "agreement": round(fmean(g == c for g, c, _ in picks), 3),
        }
    variants = _variants(engine(), trials, examples, generated, tokenizer)
    return {
        "settings": {**asdict(workload), "tasks": [t.name for t in tasks], "batch_size": recipe.model.batch_size,
                     "max_new_tokens": settings.max_new_tokens, "stop": list(settings.stop),
                     "continuation": LOGLIK_CONTINUATION},
        "generate": figures["generate"],
        "loglik": figures["loglik"],
        "speedup": round(figures["loglik"]["questions_per_s"] / figures["generate"]["questions_per_s"], 2),
        "agreement": round(fmean(g == c for g, c in zip(generated, chosen, strict=True)), 3),
        "agreement_with_option": _agreement_where_extracted(generated, chosen),
        "chance": round(fmean(1 / len(ex.options) for _, ex in examples), 3),
        "picks": {"generate": _shares(generated), "loglik": _shares(chosen)},
        "per_task": per_task,
        "variants": variants,
    }


def _tasks(workload: Workload):
    suite = load_suite(workload.suite, seed=workload.seed, train_size=1, test_size=workload.questions)
    return [task for task in [*suite.meta_train, *suite.meta_test]
            if task.test and all(is_multiple_choice(task, ex) for ex in task.test[:workload.questions])]


def _letter(response: str, example) -> str | None:
    return extract_choice(find_answer_segment(response), example.options)


def _right(letter: str | None, example) -> float:
    return float(letter is not None and letter in {a.strip().upper() for a in example.answers})


def _agreement_where_extracted(generated: list, chosen: list) -> float | None:
    pairs = [(g, c) for g, c in zip(generated, chosen, strict=True) if g is not None]
    return round(fmean(g == c for g, c in pairs), 3) if pairs else None


def _shares(letters: list) -> dict:
    """How often each letter was picked (None: no option extracted), as fractions."""
    counts = Counter("none" if letter is None else letter for letter in letters)
    return {key: round(count / len(letters), 3) for key, count in sorted(counts.items())}


def _variants(engine: HFEngine, trials, examples, generated, tokenizer) -> dict:
    """Agreement and accuracy of each of ``VARIANTS``, all scored in one engine call."""
    chats = [make_chat(trial.system_prompt, trial.task.render(trial.user_prompt, ex))
             for trial in trials for ex in trial.examples]
    requests, owners = [], []
    for name, (template, _) in VARIANTS.items():
        for i, (chat, (_, ex)) in enumerate(zip(chats, examples, strict=True)):
            for letter, option in zip(LETTERS, ex.options, strict=False):
                requests.append((chat, template.format(letter=letter, option=option)))
                owners.append((name, i, letter))
    started = time.perf_counter()
    values = engine.loglikelihood(requests)
    wall = time.perf_counter() - started
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for (name, i, letter), value, (_, text) in zip(owners, values, requests, strict=True):
        if VARIANTS[name][1] == "mean":
            value /= max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        if (name, i) not in best or value > best[(name, i)][0]:
            best[(name, i)] = (value, letter)
    figures = {"wall_s": round(wall, 2), "prefill_tokens": engine.stats.prefill_tokens}
    for name, (template, normalize) in VARIANTS.items():
        chosen = [best[(name, i)][1] for i in range(len(examples))]
        figures[name] = {
            "continuation": template, "normalize": normalize,
            "accuracy": round(fmean(_right(c, ex) for c, (_, ex) in zip(chosen, examples, strict=True)), 3),
            "agreement": round(fmean(g == c for g, c in zip(generated, chosen, strict=True)), 3),
            "agreement_with_option": _agreement_where_extracted(generated, chosen),
        }
    return figures


def lines(figures: dict) -> list[str]:
    """The section's table block."""
    if "skipped" in figures:
        return [f"loglik: skipped: {figures['skipped']}"]
    s, gen, ll = figures["settings"], figures["generate"], figures["loglik"]
    out = [f"loglik: scoring: loglik vs generation on {gen['questions']} multiple-choice questions "
           f"({', '.join(s['tasks'])}; {s['questions']} each), system prompt {s['system_prompt']!r}, initial user "
           f"prompts, batch {s['batch_size']}, generation max {s['max_new_tokens']} new tokens",
           f"{'method':<10}{'q/s':>8}{'wall s':>9}{'accuracy':>10}{'prefill tok':>13}{'gen tok':>9}"]
    for name, f in (("generate", gen), ("loglik", ll)):
        out.append(f"{name:<10}{f['questions_per_s']:>8.2f}{f['wall_s']:>9.1f}{f['accuracy']:>10.3f}"
                   f"{f['prefill_tokens']:>13}{f['generated_tokens']:>9}")
    out.append(f"loglik speedup {figures['speedup']}x; agreement {figures['agreement']:.3f} "
               f"({figures['agreement_with_option']} where generation gave an option, which it did for "
               f"{gen['with_option']:.3f}); chance accuracy {figures['chance']:.3f}")
    out.append(f"picks: generate {figures['picks']['generate']}; loglik {figures['picks']['loglik']}")
    for task, f in figures["per_task"].items():
        out.append(f"  {task:<34} n={f['questions']:<4} generate {f['generate_accuracy']:.3f}  "
                   f"loglik {f['loglik_accuracy']:.3f}  agreement {f['agreement']:.3f}  chance {f['chance']:.3f}")
    variants = figures["variants"]
    out.append(f"continuation variants (all in one loglik call: {variants['wall_s']} s, "
               f"{variants['prefill_tokens']} tokens computed):")
    for name, f in variants.items():
        if isinstance(f, dict):
            out.append(f"  {name:<23} {f['continuation']!r:<40} {f['normalize']:<5} accuracy {f['accuracy']:.3f}  "
                       f"agreement {f['agreement']:.3f} ({f['agreement_with_option']} where generation gave an option)")
    return out


def main(out: str | None = None, quick: bool = False) -> dict:
    """This section alone on the embedded model: prints the table block, writes the JSON to ``out``."""
    model, tokenizer = load_model(ModelSpec(name_or_path="smollm2-135m-instruct", dtype="float32"))
    try:
        figures = run(model, tokenizer, QUICK if quick else Workload())
    except MetaspoError as error:  # e.g. BIG-bench not fetched and no network
        figures = {"skipped": str(error)}
    print("\n".join(lines(figures)))
    if out:
        with open(out, "w") as handle:
            handle.write(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    main(arguments.out, arguments.quick)
