"""MetaSPO and its variants: an inner loop on user prompts per task, an outer loop on the system prompt."""

from __future__ import annotations

from ...tasks.task import Task
from ..candidates import Beam, BilevelState, mean_score
from ..context import SearchContext
from ..proposals import (
    ProposeSystem,
    ProposeUser,
    ape_system_prompts,
    ape_user_prompts,
    rewrite_system_prompts,
    rewrite_user_prompts,
)
from ..racing import cannot_be_adopted, cannot_enter_beams
from ..registry import SearchOutcome, register


@register("metaspo", optimizes_system=True)
def metaspo(ctx: SearchContext, tasks: list[Task]) -> SearchOutcome:
    """Both loops; candidates are rewrites that answer an analysis of failures."""
    return bilevel(ctx, tasks, rewrite_user_prompts, rewrite_system_prompts, ctx.config.system_candidates)


@register("outer_only", optimizes_system=True)
def outer_only(ctx: SearchContext, tasks: list[Task]) -> SearchOutcome:
    """No inner loop: its optimizer calls go to extra system candidates, so the total matches metaspo."""
    candidates = ctx.config.system_candidates + len(tasks) * ctx.config.user_candidates
    return bilevel(ctx, tasks, None, rewrite_system_prompts, candidates)


@register("metaspo_ape", optimizes_system=True)
def metaspo_ape(ctx: SearchContext, tasks: list[Task]) -> SearchOutcome:
    """Both loops; candidates are written from input/output demos instead of failures."""
    return bilevel(ctx, tasks, ape_user_prompts, ape_system_prompts, ctx.config.system_candidates)


def bilevel(
    ctx: SearchContext,
    tasks: list[Task],
    propose_user: ProposeUser | None,
    propose_system: ProposeSystem,
    system_candidates: int,
) -> SearchOutcome:
    """Score the initial prompts; then each iteration: inner step (if any), outer step, history entry."""
    state = initial_state(ctx, tasks)
    ctx.keep(state.nodes())
    ctx.record(0, state.score, None, False)
    for iteration in range(1, ctx.config.iterations + 1):
        if propose_user:
            inner_step(ctx, state, propose_user, iteration)
            ctx.keep(state.nodes())
        best_score, adopted = outer_step(ctx, state, propose_system, system_candidates, iteration)
        ctx.keep(state.nodes())
        ctx.record(iteration, state.score, best_score, adopted)
    return SearchOutcome(state.system_prompt, state.user_prompts(), ctx.history)


def initial_state(ctx: SearchContext, tasks: list[Task]) -> BilevelState:
    system_prompt = ctx.config.initial_system_prompt
    nodes = [ctx.nodes.new(t.name, system_prompt, t.initial_prompt, 0, "initial") for t in tasks]
    ctx.score(nodes, 0, "init")
    state = BilevelState(system_prompt, {n.task: Beam(ctx.config.top_k, [n]) for n in nodes})
    ctx.emit(0, "init", score=state.score)
    return state


def inner_step(ctx: SearchContext, state: BilevelState, propose_user: ProposeUser, iteration: int) -> None:
    """Each task's best user prompt -> ``user_candidates`` new ones; each beam keeps its ``top_k`` best."""
    parents = [beam.best for beam in state.beams.values()]
    proposals = propose_user(ctx, parents, ctx.config.user_candidates, iteration)
    children = [
        [ctx.nodes.new(p.task, p.system_prompt, text, iteration, "user", parent=p) for text in texts if text]
        for p, texts in zip(parents, proposals, strict=True)
    ]
    flat = [c for group in children for c in group]
    ctx.race(flat, cannot_enter_beams(state.beams, flat), iteration, "inner")
    for parent, group in zip(parents, children, strict=True):
        # Racing stops only candidates that cannot be kept; the beam ranks the others as usual.
        state.beams[parent.task].extend([c for c in group if c.train_score is not None])
    ctx.emit(iteration, "inner", score=state.score, candidates=len(flat),
             stopped=sum(c.train_score is None for c in flat))


def outer_step(
    ctx: SearchContext, state: BilevelState, propose_system: ProposeSystem, count: int, iteration: int
) -> tuple[float | None, bool]:
    """``count`` system candidates, each scored with every kept user prompt of every task; the best is
    adopted only if its mean beats the incumbent's over the same pairs. Returns (best score, adopted)."""
    texts = [text for text in propose_system(ctx, state, count, iteration) if text is not None]
    incumbent = state.nodes()
    candidates = [
        [ctx.nodes.new(n.task, text, n.user_prompt, iteration, "system", parent=n) for n in incumbent]
        for text in texts
    ]
    incumbent_score = state.score
    k = len(incumbent)
    groups = [range(j * k, (j + 1) * k) for j in range(len(candidates))]  # candidate j's nodes
    ctx.race([n for nodes in candidates for n in nodes], cannot_be_adopted(groups, incumbent_score),
             iteration, "outer")
    # Candidates racing stopped cannot be adopted; without racing every candidate is scored.
    scores = {
        j: mean_score(nodes) for j, nodes in enumerate(candidates) if all(n.train_score is not None for n in nodes)
    }
    best = max(scores, key=scores.__getitem__, default=None)  # the first of equal bests
    adopted = best is not None and scores[best] > incumbent_score
    if adopted:
        state.adopt(texts[best], candidates[best])
    best_score = scores[best] if best is not None else None
    ctx.emit(
        iteration,
        "outer",
        previous_score=incumbent_score,
        best_candidate_score=best_score,
        adopted=adopted,
        score=state.score,
        candidates=len(texts),
        stopped=len(texts) - len(scores),
        system_prompt=state.system_prompt,
    )
    return best_score, adopted
