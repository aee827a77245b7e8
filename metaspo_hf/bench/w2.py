"""Workload W2: what one meta-training iteration costs, our way and the reference's way.

The same MetaSPO search (one iteration: initial scoring, inner step, outer step) runs twice on the
same model, tasks, budget and seed:

- ``ours``: a response cache in front of the engine, the base LM stopping at ``</answer>``,
  shared-prefix KV reuse, exact racing of candidates (``search.racing``), the scorer's dedupe of
  identical chats in a batch, and the optimizer's requests of a step sent as one batch;
- ``reference``: the paper code's way: no cache, no stop strings, no prefix reuse, no racing (every
  candidate scored on every training question), every chat generated even when a batch holds it
  twice, and the optimizer's requests generated one at a time (batch size 1).

Where the paper code spends base generations, and so what ``reference`` counts: every node it makes
is scored once on every training question (``evaluate_node`` right after the node is written);
kept nodes keep their scores and are not scored again in later steps. So within one iteration no
(system, user, question) is generated twice unless two candidates coincide (an optimizer that
returns the prompt it was given, or two equal rewrites); those repeats are generated again by the
reference and answered from the cache (or the scorer's dedupe) by ours.

Counted: base generations and batches, generated tokens (per role), optimizer calls, generations
racing skipped and wall time; and whether both ways end with the same system and user prompts.
Stopping at ``</answer>`` changes the text after the answer, which the optimizer sees in failure
examples, so the two runs may part ways; the comparison says so rather than assuming otherwise.
Run alone with ``python -m metaspo_hf.bench.w2`` (``--quick``, ``--out FILE``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..errors import MetaspoError
from ..models.base import LM, GenerationSettings
from ..models.cache import CachedEngine
from ..models.engine import HFEngine
from ..models.loading import ModelSpec, load_model
from ..recipe import load_recipe
from ..search import SearchConfig, run_search
from ..tasks.registry import load_task
from . import print_and_write


@dataclass(frozen=True)
class RunCost:
    # Two short-question BIG-bench tasks (as in the smoke recipe): the iteration stays ~a minute on 2 cores.
    tasks: tuple[str, ...] = ("bigbench:navigate", "bigbench:sports_understanding")
    # The embedded recipe's search sizes: both loops and the adoption test run, at the least cost.
    system_candidates: int = 2
    user_candidates: int = 1
    top_k: int = 1
    train_size: int = 6
    # The embedded recipe's base length when W2 was written (the recipe now has 32: ``at_recipe``).
    base_new_tokens: int = 48
    # Half the recipe's 256: one-at-a-time optimizer calls would otherwise dominate the whole benchmark.
    optimizer_new_tokens: int = 128
    # The engine batch of the embedded recipe.
    batch_size: int = 32
    seed: int = 0
    # Our way races candidates (the search's default); the CPU recipes turn it off (``at_recipe``).
    racing: bool = True
    # The recipe whose settings these are, if any (``at_recipe``).
    recipe: str | None = None

    def budget(self, ours: bool) -> SearchConfig:
        return SearchConfig(method="metaspo", iterations=1, system_candidates=self.system_candidates,
                            user_candidates=self.user_candidates, top_k=self.top_k, train_size=self.train_size,
                            racing=ours and self.racing)

    def at_recipe(self, name: str, sizes: bool = True) -> RunCost:
        """These tasks, at a shipped recipe's search sizes, token budgets, batch, seed and racing: what a user
        running that recipe gets (on the benchmark's model, whatever model the recipe names). With ``sizes``
        off, only its racing (a smoke check keeps its own small sizes)."""
        recipe = load_recipe(name)
        search, generation = recipe.search, recipe.generation
        if not sizes:
            return replace(self, racing=search.racing, recipe=name)
        return replace(self, system_candidates=search.system_candidates, user_candidates=search.user_candidates,
                       top_k=search.top_k, train_size=search.train_size,
                       base_new_tokens=generation.base.max_new_tokens,
                       optimizer_new_tokens=generation.optimizer.max_new_tokens,
                       batch_size=recipe.model.batch_size, seed=recipe.seed, racing=search.racing, recipe=name)


QUICK = RunCost(tasks=("bigbench:navigate",), system_candidates=1, user_candidates=1, top_k=1, train_size=3,
                base_new_tokens=16, optimizer_new_tokens=32)


@dataclass
class WayCost:
    wall_s: float
    base_generations: int
    base_batches: int
    racing_skipped: int
    optimizer_calls: int
    optimizer_batch_size: int
    base_generated_tokens: int
    optimizer_generated_tokens: int
    prefill_tokens: int
    cache_hits: int
    system_prompt: str
    user_prompts: dict = field(default_factory=dict)
    incumbent_scores: list = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return self.base_generated_tokens + self.optimizer_generated_tokens


def run_way(model, tokenizer, cost: RunCost, tasks, ours: bool, folder: Path) -> WayCost:
    base_settings = GenerationSettings(max_new_tokens=cost.base_new_tokens, seed=cost.seed,
                                       stop=("</answer>",) if ours else ())
    optimizer_settings = GenerationSettings(max_new_tokens=cost.optimizer_new_tokens, temperature=1.0,
                                            seed=cost.seed)
    base_engine = HFEngine(model, tokenizer, "bench", batch_size=cost.batch_size, prefix_reuse=ours,
                           progress=False)
    # Reference: the engine generates the optimizer's rows one at a time, as the paper code's loop of
    # single `generate` calls does (per-row sampling generators: the same samples as one batch).
    optimizer_batch = cost.batch_size if ours else 1
    optimizer_engine = HFEngine(model, tokenizer, "bench", batch_size=optimizer_batch, prefix_reuse=ours,
                                progress=False)
    base_front, optimizer_front = base_engine, optimizer_engine
    if ours:
        base_front = CachedEngine(base_engine, folder / "responses.sqlite", model_id="bench-base")
        optimizer_front = CachedEngine(optimizer_engine, folder / "responses.sqlite", model_id="bench-optimizer")
    base = LM(base_front, base_settings, role="base")
    optimizer = LM(optimizer_front, optimizer_settings, role="optimizer")
    started = time.perf_counter()
    # Without dedupe the scorer generates every copy of identical chats, as the paper code does.
    result = run_search("metaspo", tasks, base, optimizer, cost.budget(ours), cost.seed, dedupe=ours)
    wall = time.perf_counter() - started
    print(f"[bench] W2{' at ' + cost.recipe if cost.recipe else ''} {'ours' if ours else 'reference'}: {wall:.1f} s, {base_engine.stats.prompts} base generations, "
          f"{base_engine.stats.generated_tokens} + {optimizer_engine.stats.generated_tokens} generated tokens",
          file=sys.stderr, flush=True)
    for front in (base_front, optimizer_front):
        if isinstance(front, CachedEngine):
            front.close()
    return WayCost(
        wall_s=wall,
        base_generations=base_engine.stats.prompts,
        base_batches=result.counts["base_batches"],
        racing_skipped=result.counts["racing_skipped"],
        optimizer_calls=result.counts["optimizer_calls"],
        optimizer_batch_size=optimizer_batch,
        base_generated_tokens=base_engine.stats.generated_tokens,
        optimizer_generated_tokens=optimizer_engine.stats.generated_tokens,
        prefill_tokens=base_engine.stats.prefill_tokens + optimizer_engine.stats.prefill_tokens,
        cache_hits=(base_front.stats.cache_hits + optimizer_front.stats.cache_hits) if ours else 0,
        system_prompt=result.system_prompt,
        user_prompts=result.user_prompts,
        incumbent_scores=[h["incumbent_score"] for h in result.history],
    )


def run(model, tokenizer, cost: RunCost) -> dict:
    """Both ways on the same tasks; the figures and their ratios (ours / reference)."""
    tasks = [load_task(name, seed=cost.seed, train_size=cost.train_size, test_size=1) for name in cost.tasks]
    with tempfile.TemporaryDirectory(prefix="metaspo-bench-w2-") as folder:
        ours = run_way(model, tokenizer, cost, tasks, ours=True, folder=Path(folder))
        reference = run_way(model, tokenizer, cost, tasks, ours=False, folder=Path(folder))
    ways = {"ours": ours, "reference": reference}
    hidden = ("system_prompt", "user_prompts", "incumbent_scores")
    figures = {name: {**{k: v for k, v in asdict(way).items() if k not in hidden},
                      "generated_tokens": way.generated_tokens, "wall_s": round(way.wall_s, 2)}
               for name, way in ways.items()}
    return {
        "settings": {**asdict(cost), "tasks": list(cost.tasks), "method": "metaspo", "iterations": 1,
                     "racing_rounds": SearchConfig().racing_rounds},
        **figures,
        "ratio": {
            "generated_tokens": _ratio(ours.generated_tokens, reference.generated_tokens),
            "base_generated_tokens": _ratio(ours.base_generated_tokens, reference.base_generated_tokens),
            "optimizer_generated_tokens": _ratio(ours.optimizer_generated_tokens,
                                                 reference.optimizer_generated_tokens),
            "base_generations": _ratio(ours.base_generations, reference.base_generations),
            "wall_s": _ratio(ours.wall_s, reference.wall_s),
        },
        "same_prompts_selected": (ours.system_prompt, ours.user_prompts) == (reference.system_prompt,
                                                                            reference.user_prompts),
        "same_incumbent_scores": ours.incumbent_scores == reference.incumbent_scores,
    }


def lines(figures: dict) -> list[str]:
    """W2's table, as printed by `metaspo bench`."""
    if "skipped" in figures:
        return [f"W2: skipped: {figures['skipped']}"]
    s = figures["settings"]
    where = f" at {s['recipe']}'s settings" if s.get("recipe") else ""
    out = [f"W2{where}: one MetaSPO iteration on {', '.join(s['tasks'])} ({s['train_size']} questions each, "
           f"{s['user_candidates']} user / {s['system_candidates']} system candidates, top-k {s['top_k']}, "
           f"{s['base_new_tokens']}/{s['optimizer_new_tokens']} new tokens, racing {'on' if s['racing'] else 'off'})",
           f"{'way':<11}{'wall s':>9}{'base gens':>11}{'batches':>9}{'raced out':>11}{'optimizer calls':>17}"
           f"{'base tokens':>13}{'optimizer tokens':>18}{'all tokens':>12}{'cache hits':>12}"]
    for way in ("ours", "reference"):
        f = figures[way]
        out.append(f"{way:<11}{f['wall_s']:>9.1f}{f['base_generations']:>11}{f['base_batches']:>9}"
                   f"{f['racing_skipped']:>11}{f['optimizer_calls']:>17}{f['base_generated_tokens']:>13}"
                   f"{f['optimizer_generated_tokens']:>18}{f['generated_tokens']:>12}{f['cache_hits']:>12}")
    r = figures["ratio"]
    out.append(f"ours / reference: generated tokens {r['generated_tokens']} (base {r['base_generated_tokens']}, "
               f"optimizer {r['optimizer_generated_tokens']}), base generations {r['base_generations']}, "
               f"wall time {r['wall_s']}; same prompts selected: {figures['same_prompts_selected']}")
    return out


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def main(argv: list[str] | None = None) -> dict:
    """W2 alone on the embedded model: prints the table, writes the JSON (``--out``)."""
    parser = argparse.ArgumentParser(prog="python -m metaspo_hf.bench.w2", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the figures")
    parser.add_argument("--quick", action="store_true", help="a smaller workload, for a smoke check")
    parser.add_argument("--train-size", type=int, help="training questions per task (default: RunCost's)")
    parser.add_argument("--recipe", help="a shipped recipe whose search sizes, token budgets and racing to use")
    args = parser.parse_args(argv)
    cost = QUICK if args.quick else RunCost()
    if args.recipe:
        try:
            cost = cost.at_recipe(args.recipe)
        except MetaspoError as error:  # checked before the model loads
            parser.error(error.one_line())
    if args.train_size:
        cost = replace(cost, train_size=args.train_size)
    torch.set_num_threads(2)  # as W1: the 2 cores of the reference machine
    model, tokenizer = load_model(ModelSpec(name_or_path="smollm2-135m-instruct", dtype="float32"))
    figures = run(model, tokenizer, cost)
    print_and_write(lines(figures), figures, args.out)
    return figures


if __name__ == "__main__":
    main()
