"""The search configuration: the recipe's `search:` section.

Defaults are the paper code's settings; each carries the reason it is what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MetaspoError, did_you_mean
from .registry import get_method

SYSTEM_EDITS = ("rewrite", "add")
GUARD_RULES = ("mean", "low", "broad")
# The methods whose outer step writes candidates from failures (proposals.rewrite_system_prompts).
COMPONENT_METHODS = ("metaspo", "outer_only")


@dataclass
class SearchConfig:
    # The full bilevel method; the other registered names are its ablations and baselines.
    method: str = "metaspo"
    # The paper code runs 3 inner+outer iterations; scores plateau after that.
    iterations: int = 3
    # The paper code writes 9 system-prompt candidates per outer step.
    system_candidates: int = 9
    # The paper code writes 3 user-prompt candidates per task per inner step.
    user_candidates: int = 3
    # The paper code keeps the 3 best user prompts per task (and the SPRIG-style population size).
    top_k: int = 3
    # 50 training questions per task, as in the paper code: enough to rank prompts, cheap to score.
    train_size: int = 50
    # Up to 500 test questions per task, as in the paper code.
    test_size: int = 500
    # The paper code shows the optimizer 3 failures when rewriting one user prompt.
    wrong_examples: int = 3
    # The paper code gathers 2 failures from each task for the system-prompt analysis.
    wrong_examples_per_task: int = 2
    # The paper code's APE writes a user prompt from 10 input/output demos.
    ape_demos: int = 10
    # The paper code's MetaSPO-APE writes a system prompt from 5 demos of each task.
    ape_demos_per_task: int = 5
    # Two re-asks let a sampled optimizer fix its format; more would mostly burn calls.
    max_parse_retries: int = 2
    # Longer optimizer output is a runaway generation, not a prompt (paper prompts are < 2k chars).
    max_prompt_chars: int = 4000
    # The paper starts the search from the default assistant prompt.
    initial_system_prompt: str = "You are a helpful assistant."
    # How an outer step changes the system prompt: "rewrite" it whole (the paper's method), or "add" one
    # instruction to it (a 1.5B optimizer's whole rewrites were mostly unusable: docs/results.md).
    system_edit: str = "rewrite"
    # Give each system-prompt candidate one kind of mistake to concentrate on (not in the paper; like
    # MIPRO's proposal tips): asked about every behaviour at once, a small optimizer writes the same
    # generic prompt each time and never a short, specific one (docs/results.md).
    system_focus: bool = False
    # Also try this many sentences of the SPRIG-style component pool, each appended to the current prompt,
    # as system candidates of each outer step (not in the paper; metaspo and outer_only); 0, because each costs
    # a scoring pass and in a knowledge seed none beat the optimizer's candidates (docs/results.md).
    system_components: int = 0
    # Caps SPRIG-style prompts so that repeated "add" edits cannot grow them without bound.
    sprig_max_components: int = 12
    # Exact racing (not in the paper code): stop scoring a candidate once it provably can no longer be
    # kept or adopted; never changes which prompts are selected, only skips scoring (docs/method.md).
    racing: bool = True
    # Racing rounds per scoring step, each one base batch: more rounds stop losers sooner but make
    # smaller batches; 3 keeps each round a third of the step's batch.
    racing_rounds: int = 3
    # The validation guard (not in the paper's method, so off here; the product's recipes turn it on):
    # keep the searched system prompt only if it beats the initial one on held-out training questions.
    guard: bool = False
    # Training questions per task held out of the search for the guard (taken after train_size).
    validation_size: int = 0
    # How much the searched prompt's paired gain on those questions must exceed; 0 = any gain.
    guard_margin: float = 0.0
    # Which end of that gain must pass the margin: its "mean", or the "low" end of its 95% interval (never
    # keeps a gain inside the noise, but on 64-128 held-out items it keeps only large ones: docs/method.md);
    # "broad": the low end, also with each meta-train task left out in turn (a gain one task carries is not kept).
    guard_rule: str = "mean"

    def __post_init__(self):
        get_method(self.method, key="search.method")
        for name in (
            "iterations",
            "system_candidates",
            "user_candidates",
            "top_k",
            "train_size",
            "test_size",
            "wrong_examples",
            "wrong_examples_per_task",
            "ape_demos",
            "ape_demos_per_task",
            "max_prompt_chars",
            "sprig_max_components",
            "racing_rounds",
        ):
            require_int("search", name, getattr(self, name), minimum=1)
        require_int("search", "max_parse_retries", self.max_parse_retries, minimum=0)
        require_int("search", "validation_size", self.validation_size, minimum=0)
        require_int("search", "system_components", self.system_components, minimum=0)
        if self.system_components and self.method not in COMPONENT_METHODS:
            raise MetaspoError(f"search.system_components applies to {' and '.join(COMPONENT_METHODS)}, "
                               f"not to search.method {self.method!r}", hint="set search.system_components: 0")
        for name in ("racing", "guard", "system_focus"):
            if not isinstance(getattr(self, name), bool):
                raise MetaspoError(f"search.{name} must be true or false, got {getattr(self, name)!r}")
        if self.guard and self.validation_size < 1:
            raise MetaspoError("search.guard is on but search.validation_size is 0",
                               hint="hold out some training questions for it, e.g. search.validation_size: 20")
        if isinstance(self.guard_margin, bool) or not isinstance(self.guard_margin, (int, float)) \
                or not 0 <= self.guard_margin < 1:
            raise MetaspoError(f"search.guard_margin must be a number in [0, 1), got {self.guard_margin!r}")
        if self.guard_rule not in GUARD_RULES:
            raise MetaspoError(f"search.guard_rule must be one of {', '.join(GUARD_RULES)}, got {self.guard_rule!r}",
                               hint=did_you_mean(str(self.guard_rule), GUARD_RULES))
        if self.system_edit not in SYSTEM_EDITS:
            raise MetaspoError(f"search.system_edit must be one of {', '.join(SYSTEM_EDITS)}, got {self.system_edit!r}",
                               hint=did_you_mean(str(self.system_edit), SYSTEM_EDITS))
        if not isinstance(self.initial_system_prompt, str):
            raise MetaspoError(
                f"search.initial_system_prompt must be a string, got {self.initial_system_prompt!r}"
            )


def require_int(section: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetaspoError(f"{section}.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise MetaspoError(f"{section}.{name} must be >= {minimum}, got {value}")
