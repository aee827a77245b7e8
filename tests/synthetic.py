"""A synthetic result.json, shaped like a finished run's: the report's and the result schema's tests read it."""

from __future__ import annotations

import random
import statistics

from metaspo_hf.evaluation.labels import TABLE_ORDER

TASKS = ("logical_deduction", "object_counting", "navigate")
LABELS = (*TABLE_ORDER, "my_prompt")


def synthetic_result(seed: int = 0, recipe: str = "smoke") -> dict:
    rng = random.Random(seed)
    scores = {
        task: {
            # Extra keys, such as the per-user-prompt scores the protocol keeps, are allowed.
            label: {
                "mean": round(rng.random(), 4),
                "sd": round(rng.random() / 5, 4),
                "n": 10,
                "scores": [0.5] * 10,
            }
            for label in LABELS
        }
        for task in TASKS
    }
    return {
        "recipe": recipe,
        "model": "smollm2-135m",
        "seed": seed,
        "method": "metaspo",
        "optimized_system_prompt": f"Think before answering (seed {seed}); put the answer in tags.",
        "system_prompts": {label: f"prompt for {label}" for label in LABELS},
        "scores": scores,
        "overall": {label: statistics.fmean(scores[t][label]["mean"] for t in TASKS) for label in LABELS},
        "adaptation": {
            task: {"default": [rng.random() for _ in range(4)], "metaspo": [rng.random() for _ in range(4)]}
            for task in TASKS[:2]
        },
        "meta_train": {
            method: [
                {
                    "iteration": i,
                    "incumbent_score": 0.3 + 0.1 * i,
                    # Iteration 0 is the starting point: no candidate was written in it.
                    "best_candidate_score": None if i == 0 else 0.35 + 0.1 * i,
                    "adopted": i % 2 == 0 and i > 0,
                    "optimizer_calls": 0 if i == 0 else 12,
                    "base_generations": 150 * (i + 1),
                }
                for i in range(4)
            ]
            for method in ("metaspo", "outer_only")
        },
        "costs": {
            "base_generations": 1200 + seed,
            "generated_tokens": 45678,
            "prefill_tokens": 123456,
            "optimizer_calls": 42,
            "cache_hits": 7,
            "seconds": 321.5,
        },
        "wall_seconds": 3725.0,
    }
