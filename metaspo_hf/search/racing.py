"""Racing: score candidates in rounds and stop scoring one as soon as it provably cannot change the outcome.

A candidate node is scored on its training questions in ``rounds`` slices. Before each round, every
node's final training score is bounded: ``lower`` counts its unscored questions as 0, ``upper`` as 1
(per-question scores lie in [0, 1]). Both bounds are computed with the very float arithmetic that
gives the final score (``fmean``, an exactly rounded sum divided by the count, which is monotone in
every input), so ``lower <= final <= upper`` holds for the floats the selection code compares, not
just for real numbers. A *rule* names the nodes whose outcome is already decided; they stop there.
All questions of one round, over every node still running, go to the base model as one batch.

The rules (docs/method.md, "Racing", has the proof that they never change which prompts are kept):

- ``cannot_enter_beams`` (inner step): a user candidate stops once ``width`` other nodes of its task
  are sure to rank ahead of it in the beam's stable sort (older nodes first among equals).
- ``cannot_be_adopted`` (outer step): a system candidate stops once its upper bound cannot beat the
  incumbent's score (adoption needs strictly more), or another candidate is sure to rank ahead of it
  (strictly higher, or equal and earlier: the first of equal bests wins).

Exactness assumes each chat's response does not depend on the other chats of its batch: greedy
decoding, the same assumption the scorer's dedupe and the response cache make. With a sampled base
model the context scores everything in one batch instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from statistics import fmean

from ..scoring import Scorer, Trial, WrongExample
from ..tasks.task import Example, Task
from .candidates import Beam, Node

# rule(lower bounds, upper bounds) -> positions of the nodes whose outcome is decided (they may stop).
Rule = Callable[[list[float], list[float]], Iterable[int]]


@dataclass
class _Run:
    """One node being raced: its questions in scoring order and what has been scored so far."""

    node: Node
    task: Task
    examples: Sequence[Example]
    order: list[int]  # indices into ``examples``, in the order they are scored
    scores: dict[int, float] = field(default_factory=dict)
    wrong: dict[int, WrongExample] = field(default_factory=dict)
    stopped: bool = False

    @property
    def complete(self) -> bool:
        return len(self.scores) == len(self.examples)

    def bounds(self) -> tuple[float, float]:
        known = list(self.scores.values())
        rest = len(self.examples) - len(known)
        return fmean(known + [0.0] * rest), fmean(known + [1.0] * rest)


def race(
    scorer: Scorer,
    nodes: Sequence[Node],
    task: Callable[[Node], Task],
    examples: Callable[[Node], Sequence[Example]],
    order: Callable[[Node], list[int]],
    rounds: int,
    rule: Rule,
    desc: str,
) -> int:
    """Score ``nodes`` in ``rounds`` rounds, stopping the nodes ``rule`` names; returns the number of
    questions left unscored. A node scored in full gets ``train_score`` and ``wrong`` exactly as one
    full-batch scoring would give them; a stopped one gets ``train_score = None`` and ``stopped_after``."""
    runs = [_Run(node, task(node), examples(node), order(node)) for node in nodes]
    for r in range(rounds + 1):
        _apply(rule, runs)  # also before the first round: a perfect incumbent stops everything unscored
        live = [run for run in runs if not run.stopped and not run.complete]
        if r == rounds or not live:
            break
        batch = []
        for run in live:
            n = len(run.order)
            picked = run.order[r * n // rounds : (r + 1) * n // rounds]
            if picked:
                chosen = [run.examples[i] for i in picked]
                trial = Trial(run.node.system_prompt, run.node.user_prompt, run.task, chosen)
                batch.append((run, picked, trial))
        results = scorer([trial for _, _, trial in batch], desc=f"{desc} (round {r + 1}/{rounds})")
        for (run, picked, _), result in zip(batch, results, strict=True):
            run.scores.update(zip(picked, result.scores, strict=True))
            for w in result.wrong:  # ``w.index`` is its position in the slice: make it the question's
                run.wrong[picked[w.index]] = replace(w, index=picked[w.index])
    skipped = 0
    for run in runs:
        if run.complete:
            scores = [run.scores[i] for i in range(len(run.examples))]
            run.node.train_score = fmean(scores) if scores else 0.0
            run.node.wrong = [run.wrong[i] for i in sorted(run.wrong)]
        else:
            run.node.train_score, run.node.wrong = None, []
            run.node.stopped_after = len(run.scores)
            skipped += len(run.examples) - len(run.scores)
    return skipped


def _apply(rule: Rule, runs: list[_Run]) -> None:
    bounds = [run.bounds() for run in runs]
    for i in rule([lo for lo, _ in bounds], [hi for _, hi in bounds]):
        if not runs[i].complete:
            runs[i].stopped = True


def cannot_enter_beams(beams: dict[str, Beam], nodes: Sequence[Node]) -> Rule:
    """Inner step: ``nodes`` (new user candidates, in creation order) extend the beams of their tasks.

    ``Beam.extend`` stably sorts (beam nodes, then new nodes in order) by score, best first, and keeps
    ``width``. Node x is sure to rank ahead of candidate c when its final score is surely higher, or
    surely at least equal while x comes earlier in that list (every beam node does). Once ``width``
    nodes are sure to rank ahead of c, c cannot be kept."""

    def rule(lower: list[float], upper: list[float]) -> list[int]:
        out = []
        for c, node in enumerate(nodes):
            beam = beams[node.task]
            ahead = sum(old.train_score >= upper[c] for old in beam.nodes)
            ahead += sum(
                1
                for x, other in enumerate(nodes)
                if x != c and other.task == node.task
                and (lower[x] > upper[c] or (lower[x] >= upper[c] and x < c))
            )
            if ahead >= beam.width:
                out.append(c)
        return out

    return rule


def cannot_be_adopted(groups: Sequence[range], incumbent: float) -> Rule:
    """Outer step: candidate j is the nodes at positions ``groups[j]``; its score is their mean.

    The best candidate (the first of equal bests) is adopted only if its score is strictly above
    ``incumbent``. Candidate j cannot be adopted once its upper bound is at most ``incumbent``, or
    once another candidate i is sure to rank ahead of it: lower(i) > upper(j), or lower(i) >=
    upper(j) with i before j."""

    def rule(lower: list[float], upper: list[float]) -> list[int]:
        lo = [fmean(lower[k] for k in group) for group in groups]
        hi = [fmean(upper[k] for k in group) for group in groups]
        out: list[int] = []
        for j, group in enumerate(groups):
            beaten = hi[j] <= incumbent or any(
                lo[i] > hi[j] or (lo[i] >= hi[j] and i < j) for i in range(len(groups)) if i != j
            )
            if beaten:
                out.extend(group)
        return out

    return rule


def failures_first(node: Node, parent: Node | None, count: int) -> list[int]:
    """Question order for racing: the questions the parent got wrong first, then the others.

    A candidate tends to fail where its parent failed, so its upper bound falls fastest this way and
    hopeless candidates stop sooner. Any order gives the same selected prompts."""
    failed = sorted({w.index for w in parent.wrong if w.index < count}) if parent else []
    seen = set(failed)
    return failed + [i for i in range(count) if i not in seen]
