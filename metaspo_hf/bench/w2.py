"""Workload W2: what one meta-training iteration costs, our way and the reference's way.

The same MetaSPO search (one iteration: initial scoring, inner step, outer step) runs twice on the
same model, tasks, budget and seed:

- ``ours``: a response cache in front of the engine, the base LM stopping at ``</answer>``,
  shared-prefix KV reuse, and the optimizer's requests of a step sent as one batch;
- ``reference``: the paper code's way: no cache, no stop strings, no prefix reuse, and the
  optimizer's requests generated one at a time (batch size 1).

Counted: base generations, generated tokens (per role), optimizer calls and wall time; and whether
both ways end with the same system and user prompts. Stopping at ``</answer>`` changes the text after
the answer, which the optimizer sees in failure examples, so the two runs may part ways; the
comparison says so rather than assuming otherwise.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..models.base import LM, GenerationSettings
from ..models.cache import CachedEngine
from ..models.engine import HFEngine
from ..search.budget import SearchBudget
from ..search.run import run_search
from ..tasks.registry import load_task


@dataclass(frozen=True)
class RunCost:
    # Two short-question BIG-bench tasks (as in the smoke recipe): the iteration stays ~a minute on 2 cores.
    tasks: tuple[str, ...] = ("bigbench:navigate", "bigbench:sports_understanding")
    # The embedded recipe's search sizes: both loops and the adoption test run, at the least cost.
    system_candidates: int = 2
    user_candidates: int = 1
    top_k: int = 1
    train_size: int = 6
    # The embedded recipe's base length.
    base_new_tokens: int = 48
    # Half the recipe's 256: one-at-a-time optimizer calls would otherwise dominate the whole benchmark.
    optimizer_new_tokens: int = 128
    # The engine batch of the embedded recipe.
    batch_size: int = 32
    seed: int = 0

    def budget(self) -> SearchBudget:
        return SearchBudget(method="metaspo", iterations=1, system_candidates=self.system_candidates,
                            user_candidates=self.user_candidates, top_k=self.top_k, train_size=self.train_size)


QUICK = RunCost(tasks=("bigbench:navigate",), system_candidates=1, user_candidates=1, top_k=1, train_size=3,
                base_new_tokens=16, optimizer_new_tokens=32)


@dataclass
class WayCost:
    wall_s: float
    base_generations: int
    optimizer_calls: int
    base_generated_tokens: int
    optimizer_generated_tokens: int
    prefill_tokens: int
    cache_hits: int
    system_prompt: str
    user_prompts: dict = field(default_factory=dict)

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
    optimizer_engine = HFEngine(model, tokenizer, "bench", batch_size=cost.batch_size if ours else 1,
                                prefix_reuse=ours, progress=False)
    base_front, optimizer_front = base_engine, optimizer_engine
    if ours:
        base_front = CachedEngine(base_engine, folder / "responses.sqlite", model_id="bench-base")
        optimizer_front = CachedEngine(optimizer_engine, folder / "responses.sqlite", model_id="bench-optimizer")
    base = LM(base_front, base_settings, role="base")
    optimizer = LM(optimizer_front, optimizer_settings, role="optimizer")
    started = time.perf_counter()
    result = run_search("metaspo", tasks, base, optimizer, cost.budget(), cost.seed)
    wall = time.perf_counter() - started
    print(f"[bench] W2 {'ours' if ours else 'reference'}: {wall:.1f} s, {base_engine.stats.prompts} base generations",
          file=sys.stderr, flush=True)
    for front in (base_front, optimizer_front):
        if isinstance(front, CachedEngine):
            front.close()
    return WayCost(
        wall_s=wall,
        base_generations=base_engine.stats.prompts,
        optimizer_calls=result.counts["optimizer_calls"],
        base_generated_tokens=base_engine.stats.generated_tokens,
        optimizer_generated_tokens=optimizer_engine.stats.generated_tokens,
        prefill_tokens=base_engine.stats.prefill_tokens + optimizer_engine.stats.prefill_tokens,
        cache_hits=(base_front.stats.cache_hits + optimizer_front.stats.cache_hits) if ours else 0,
        system_prompt=result.system_prompt,
        user_prompts=result.user_prompts,
    )


def run(model, tokenizer, cost: RunCost) -> dict:
    """Both ways on the same tasks; the figures and their ratios (ours / reference)."""
    tasks = [load_task(name, seed=cost.seed, train_size=cost.train_size, test_size=1) for name in cost.tasks]
    with tempfile.TemporaryDirectory(prefix="metaspo-bench-w2-") as folder:
        ours = run_way(model, tokenizer, cost, tasks, ours=True, folder=Path(folder))
        reference = run_way(model, tokenizer, cost, tasks, ours=False, folder=Path(folder))
    ways = {"ours": ours, "reference": reference}
    figures = {name: {**{k: v for k, v in asdict(way).items() if k not in ("system_prompt", "user_prompts")},
                      "generated_tokens": way.generated_tokens, "wall_s": round(way.wall_s, 2)}
               for name, way in ways.items()}
    return {
        "settings": {**asdict(cost), "tasks": list(cost.tasks), "method": "metaspo", "iterations": 1},
        **figures,
        "ratio": {
            "generated_tokens": _ratio(ours.generated_tokens, reference.generated_tokens),
            "base_generated_tokens": _ratio(ours.base_generated_tokens, reference.base_generated_tokens),
            "wall_s": _ratio(ours.wall_s, reference.wall_s),
        },
        "same_prompts_selected": (ours.system_prompt, ours.user_prompts) == (reference.system_prompt,
                                                                            reference.user_prompts),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None
