"""The evaluation configuration: the recipe's `evaluation:` section.

Defaults are the paper code's settings; each carries the reason it is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MetaspoError
from ..search.config import require_int
from .labels import check_labels


@dataclass
class EvaluationConfig:
    # The paper pairs each system prompt with 10 user prompts per unseen task.
    user_prompts_per_task: int = 10
    # A handful of input/output demos is enough for the optimizer to infer a task; keeps its context short.
    demos: int = 5
    # The paper's test-time adaptation runs ProTeGi for 6 iterations.
    adapt_iterations: int = 6
    # ProTeGi's beam of 3 user prompts, as in the paper code.
    beam: int = 3
    # Each beam prompt gets 3 rewrites per iteration, as in the paper code.
    adapt_candidates: int = 3
    # System prompts compared with MetaSPO's on unseen tasks: the paper's fixed baselines and searched ones.
    compare: tuple[str, ...] = ("none", "default", "cot", "service", "outer_only", "sprig")
    # Test-time adaptation starts from these system prompts besides MetaSPO's (the paper uses the default).
    adapt_compare: tuple[str, ...] = ("default",)
    # Test questions per task scored after each adaptation iteration; None = all of them (the paper).
    # Fewer keeps the second protocol cheap where every generation costs (CPU recipes).
    adapt_test_size: int | None = None
    # A folder of fixed user prompts in the reference code's layout (reference_files.py): unseen
    # generalization then scores the first user_prompts_per_task of each task's file, the paper's own,
    # instead of prompts written by the optimizer. Relative to the recipe.
    user_prompts_dir: str | None = None
    # Also score, on the unseen tasks, each searched prompt that the validation guard turned down (labelled
    # by turned_down_label), to see whether turning it down was right; off: one more prompt to evaluate.
    score_turned_down: bool = False

    def __post_init__(self):
        for name in ("user_prompts_per_task", "demos", "adapt_iterations", "beam", "adapt_candidates"):
            require_int("evaluation", name, getattr(self, name), minimum=1)
        if self.adapt_test_size is not None:
            require_int("evaluation", "adapt_test_size", self.adapt_test_size, minimum=1)
        if not isinstance(self.score_turned_down, bool):
            raise MetaspoError(f"evaluation.score_turned_down must be true or false, got {self.score_turned_down!r}")
        self.compare = check_labels("evaluation.compare", self.compare)
        self.adapt_compare = check_labels("evaluation.adapt_compare", self.adapt_compare)
