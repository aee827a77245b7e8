"""What every search step needs: the tasks, the scorer, the optimizer writer, seeds, events, counts."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..errors import MetaspoError
from ..models.base import LM, stable_hash
from ..scoring import Scorer, Trial
from ..tasks.task import Example, Task
from .candidates import Node, NodeLog
from .config import SearchConfig
from .racing import Rule, failures_first, race
from .writer import PromptWriter

EventSink = Callable[[dict], None]


class SearchContext:
    def __init__(
        self,
        method: str,
        tasks: Sequence[Task],
        base: LM,
        optimizer: LM,
        config: SearchConfig,
        seed: int,
        on_event: EventSink | None = None,
        dedupe: bool = True,
    ):
        self.method = method
        self.tasks = _by_name(tasks)
        self.config = config
        self.seed = seed
        self.on_event = on_event
        self.scorer = Scorer(base, dedupe=dedupe)
        self.writer = PromptWriter(optimizer, seed, method, config.max_parse_retries, config.max_prompt_chars)
        self.nodes = NodeLog()
        self.racing_skipped = 0  # training questions racing left unscored (generations not made)
        self.updates = 0  # how many times the kept prompts were recorded (``keep``)
        self.history: list[dict] = []
        self._counts_at_last_record = self.counts()

    def rng(self, *parts: object) -> random.Random:
        """A generator seeded by the run seed and ``parts``: the same draw on every replay."""
        return random.Random(stable_hash(self.seed, self.method, *parts))

    @property
    def reply_limit(self) -> int:
        """The base model's reply budget in tokens, which the optimizer's requests state."""
        return self.scorer.base.settings.max_new_tokens

    def train_examples(self, task: str) -> list[Example]:
        return self.tasks[task].train[: self.config.train_size]

    def score(self, nodes: list[Node], iteration: int, step: str) -> None:
        """Score every node on its task's training questions, all in one base batch."""
        trials = [
            Trial(n.system_prompt, n.user_prompt, self.tasks[n.task], self.train_examples(n.task))
            for n in nodes
        ]
        desc = f"{self.method} iteration {iteration} {step}: scoring"
        for node, result in zip(nodes, self.scorer(trials, desc=desc), strict=True):
            node.train_score, node.wrong = result.mean, result.wrong

    def race(self, nodes: list[Node], rule: Rule, iteration: int, step: str) -> None:
        """Score candidate nodes, racing them when the config asks for it (``search/racing.py``).

        Nodes whose outcome ``rule`` decides early keep ``train_score = None``; the others are scored
        exactly as ``score`` would. Without racing, or with a sampled base model (whose answers depend
        on the batch they are drawn in), this is ``score``: one batch."""
        if not (self.config.racing and self.scorer.base.settings.greedy) or not nodes:
            self.score(nodes, iteration, step)
            return
        by_id = self.nodes.nodes
        self.racing_skipped += race(
            self.scorer,
            nodes,
            task=lambda n: self.tasks[n.task],
            examples=lambda n: self.train_examples(n.task),
            order=lambda n: failures_first(
                n, by_id[n.parent_id] if n.parent_id is not None else None, len(self.train_examples(n.task))
            ),
            rounds=self.config.racing_rounds,
            rule=rule,
            desc=f"{self.method} iteration {iteration} {step}: scoring",
        )

    def keep(self, nodes: list[Node]) -> None:
        """Record ``nodes`` as the prompts kept after this update (the start, an inner or an outer step):
        the reference code's result lists them per update and task (reference_files.py)."""
        for node in nodes:
            node.kept_in.append(self.updates)
        self.updates += 1

    def counts(self) -> dict:
        return {
            **self.writer.counts(),
            "base_generations": self.scorer.generations,
            "base_batches": self.scorer.batches,
            # Multiple-choice questions answered by log-likelihood (`scoring: loglik`), not generated.
            "base_loglik_questions": self.scorer.loglik_questions,
            "racing_skipped": self.racing_skipped,
        }

    def emit(self, iteration: int, step: str, **fields) -> None:
        """Tell the caller a step is done (the run folder appends it to its event log)."""
        if self.on_event:
            self.on_event(
                {
                    "event": "search_step",
                    "method": self.method,
                    "iteration": iteration,
                    "step": step,
                    **fields,
                    **self.counts(),
                }
            )

    def record(
        self, iteration: int, incumbent_score: float, best_candidate_score: float | None, adopted: bool
    ) -> None:
        """Close an iteration: its history entry, with the calls it made."""
        now = self.counts()
        self.history.append(
            {
                "iteration": iteration,
                "incumbent_score": incumbent_score,
                "best_candidate_score": best_candidate_score,
                "adopted": adopted,
                "optimizer_calls": now["optimizer_calls"] - self._counts_at_last_record["optimizer_calls"],
                "base_generations": now["base_generations"] - self._counts_at_last_record["base_generations"],
                "racing_skipped": now["racing_skipped"] - self._counts_at_last_record["racing_skipped"],
            }
        )
        self._counts_at_last_record = now


def _by_name(tasks: Sequence[Task]) -> dict[str, Task]:
    if not tasks:
        raise MetaspoError("the search needs at least one task")
    by_name: dict[str, Task] = {}
    for task in tasks:
        if task.name in by_name:
            raise MetaspoError(f"task {task.name!r} is listed twice")
        if not task.train:
            raise MetaspoError(
                f"task {task.name!r} has no training examples", hint="the search scores prompts on them"
            )
        by_name[task.name] = task
    return by_name
