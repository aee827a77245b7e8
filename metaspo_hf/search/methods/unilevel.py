"""User-prompt baselines with a fixed system prompt: ProTeGi-style beam search and APE."""

from __future__ import annotations

from statistics import fmean

from ...tasks.task import Task
from ..candidates import Beam, Node
from ..context import SearchContext
from ..proposals import ProposeUser, ape_user_prompts, resample_user_prompts, rewrite_user_prompts
from ..registry import SearchOutcome, register


@register("protegi", optimizes_system=False)
def protegi(ctx: SearchContext, tasks: list[Task]) -> SearchOutcome:
    """Every beam prompt -> failures -> analysis -> ``user_candidates`` rewrites; keep the ``top_k`` best."""
    return _single_system_search(ctx, tasks, rewrite_user_prompts)


@register("ape", optimizes_system=False)
def ape(ctx: SearchContext, tasks: list[Task]) -> SearchOutcome:
    """Iteration 1 writes prompts from demos; later iterations paraphrase the beam (APE's resampling)."""
    return _single_system_search(ctx, tasks, ape_then_resample)


def ape_then_resample(
    ctx: SearchContext, parents: list[Node], count: int, iteration: int
) -> list[list[str | None]]:
    propose = ape_user_prompts if iteration == 1 else resample_user_prompts
    return propose(ctx, parents, count, iteration)


def _single_system_search(ctx: SearchContext, tasks: list[Task], propose: ProposeUser) -> SearchOutcome:
    system_prompt = ctx.config.initial_system_prompt
    starts = [ctx.nodes.new(t.name, system_prompt, t.initial_prompt, 0, "initial") for t in tasks]
    config = ctx.config
    beams, _ = user_prompt_search(
        ctx, starts, config.iterations, config.top_k, config.user_candidates, propose
    )
    return SearchOutcome(
        system_prompt, {b.best.task: [n.user_prompt for n in b.nodes] for b in beams}, ctx.history
    )


def user_prompt_search(
    ctx: SearchContext, starts: list[Node], iterations: int, width: int, per_node: int, propose: ProposeUser
) -> tuple[list[Beam], list[list[Node]]]:
    """Beam search on the user prompt of each start node, its system prompt fixed; all beams advance
    together, one optimizer batch per phase and one scoring batch per iteration.

    Returns the final beams and, per iteration (0 = the starts), the best node of each beam.
    """
    ctx.score(starts, 0, "init")
    beams = [Beam(width, [start]) for start in starts]
    ctx.keep([node for beam in beams for node in beam.nodes])
    trail = [[beam.best for beam in beams]]
    ctx.record(0, _mean_best(beams), None, False)
    ctx.emit(0, "init", score=_mean_best(beams))
    for iteration in range(1, iterations + 1):
        parents = [node for beam in beams for node in beam.nodes]
        proposals = propose(ctx, parents, per_node, iteration)
        children = {
            p.id: [
                ctx.nodes.new(p.task, p.system_prompt, text, iteration, "user", parent=p)
                for text in texts
                if text
            ]
            for p, texts in zip(parents, proposals, strict=True)
        }
        ctx.score([c for group in children.values() for c in group], iteration, "user")
        previous_best = [beam.best for beam in beams]
        for beam in beams:
            beam.extend([c for parent in beam.nodes for c in children[parent.id]])
        ctx.keep([node for beam in beams for node in beam.nodes])
        trail.append([beam.best for beam in beams])
        scores = [c.train_score for group in children.values() for c in group]
        adopted = any(beam.best is not old for beam, old in zip(beams, previous_best, strict=True))
        ctx.record(iteration, _mean_best(beams), max(scores, default=None), adopted)
        ctx.emit(iteration, "user", score=_mean_best(beams), candidates=len(scores), adopted=adopted)
    return beams, trail


def _mean_best(beams: list[Beam]) -> float:
    return fmean(beam.best.train_score for beam in beams)
