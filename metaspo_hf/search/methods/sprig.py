"""A SPRIG-style system-prompt search: edits and recombination of sentences from a component pool.

A system prompt is a sequence of components (sentences). Each iteration makes new prompts from a
population of the best ones by one random edit each: add a pool component, delete one, swap two,
replace one with a pool component, cross two parents over, or have the optimizer rephrase one.
Candidates are scored with each task's initial user prompt (no inner loop); the population keeps the
``top_k`` best. See docs/method.md.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ...tasks.task import Task
from .. import prompts
from ..candidates import Node, mean_score
from ..context import SearchContext
from ..registry import SearchOutcome, register


@dataclass
class Genome:
    """A system prompt as components, with its nodes (one per task, each task's initial user prompt)."""

    components: tuple[str, ...]
    nodes: list[Node]

    @property
    def system_prompt(self) -> str:
        return join(self.components)

    @property
    def score(self) -> float:
        return mean_score(self.nodes)


@dataclass
class Edit:
    parent: Genome
    components: tuple[str, ...]
    # Index of the component the optimizer should rephrase, or None for an edit that is already done.
    rephrase_at: int | None = None


@register("sprig", optimizes_system=True)
def sprig(ctx: SearchContext, tasks: list[Task]) -> SearchOutcome:
    start = _genome(ctx, split(ctx.config.initial_system_prompt), None, 0)
    ctx.score(start.nodes, 0, "init")
    population = [start]
    ctx.keep(start.nodes)
    ctx.record(0, start.score, None, False)
    ctx.emit(0, "init", score=start.score)
    # As many candidates per iteration as outer_only makes, so the two spend the same scoring config.
    count = ctx.config.system_candidates + len(tasks) * ctx.config.user_candidates
    for iteration in range(1, ctx.config.iterations + 1):
        edits = [
            plan_edit(
                ctx.rng(iteration, "edit", j), population, prompts.component_pool(), ctx.config.sprig_max_components
            )
            for j in range(count)
        ]
        candidates = _new_genomes(ctx, _rephrase(ctx, edits, iteration), population, iteration)
        ctx.score([n for g in candidates for n in g.nodes], iteration, "system")
        previous_best = population[0]
        population = sorted(population + candidates, key=lambda g: -g.score)[: ctx.config.top_k]
        ctx.keep([n for g in population for n in g.nodes])
        best_candidate = max((g.score for g in candidates), default=None)
        adopted = population[0] is not previous_best
        ctx.record(iteration, population[0].score, best_candidate, adopted)
        ctx.emit(
            iteration,
            "system",
            score=population[0].score,
            best_candidate_score=best_candidate,
            adopted=adopted,
            candidates=len(candidates),
            system_prompt=population[0].system_prompt,
        )
    return SearchOutcome(
        population[0].system_prompt, {t.name: [t.initial_prompt] for t in tasks}, ctx.history
    )


def plan_edit(
    rng: random.Random, population: list[Genome], pool: tuple[str, ...], max_components: int
) -> Edit:
    """One random edit of a random parent, chosen among the edits that apply to it."""
    parent = rng.choice(population)
    parts = list(parent.components)
    unused = [c for c in pool if c not in parts]
    edits = [
        name
        for name, applies in (
            ("add", len(parts) < max_components and unused),
            ("delete", len(parts) > 1),
            ("swap", len(parts) > 1),
            ("replace", parts and unused),
            ("rephrase", parts),
            ("crossover", len(population) > 1),
        )
        if applies
    ]
    edit = rng.choice(edits)
    if edit == "add":
        parts.insert(rng.randint(0, len(parts)), rng.choice(unused))
    elif edit == "delete":
        del parts[rng.randrange(len(parts))]
    elif edit == "swap":
        i, j = rng.sample(range(len(parts)), 2)
        parts[i], parts[j] = parts[j], parts[i]
    elif edit == "replace":
        parts[rng.randrange(len(parts))] = rng.choice(unused)
    elif edit == "rephrase":
        return Edit(parent, tuple(parts), rng.randrange(len(parts)))
    else:  # crossover: a head of this parent, then a tail of another one
        other = rng.choice([g for g in population if g is not parent]).components
        head = parts[: rng.randint(0, len(parts))]
        parts = (head + [c for c in other[rng.randint(0, len(other)) :] if c not in head])[:max_components]
    return Edit(parent, tuple(parts))


def _rephrase(ctx: SearchContext, edits: list[Edit], iteration: int) -> list[Edit]:
    """Ask the optimizer for every rephrasing in one batch; an edit whose rephrasing failed is dropped."""
    pending = [i for i, e in enumerate(edits) if e.rephrase_at is not None]
    texts = ctx.writer.prompts(
        [prompts.sprig_rephrase(edits[i].components[edits[i].rephrase_at]) for i in pending],
        "system",
        iteration,
        "rephrase",
    )
    rephrased = dict(zip(pending, texts, strict=True))
    done = []
    for i, e in enumerate(edits):
        if e.rephrase_at is None:
            done.append(e)
        elif rephrased[i] is not None:
            parts = list(e.components)
            parts[e.rephrase_at] = rephrased[i]
            done.append(Edit(e.parent, tuple(parts)))
    return done


def _new_genomes(
    ctx: SearchContext, edits: list[Edit], population: list[Genome], iteration: int
) -> list[Genome]:
    """A genome per edit, skipping prompts already in the population or made earlier this iteration."""
    seen = {g.system_prompt for g in population}
    genomes = []
    for e in edits:
        if join(e.components) not in seen:
            seen.add(join(e.components))
            genomes.append(_genome(ctx, e.components, e.parent, iteration))
    return genomes


def _genome(ctx: SearchContext, components: tuple[str, ...], parent: Genome | None, iteration: int) -> Genome:
    system_prompt = join(components)
    nodes = [
        ctx.nodes.new(
            name,
            system_prompt,
            task.initial_prompt,
            iteration,
            "initial" if parent is None else "system",
            parent=parent.nodes[i] if parent else None,
        )
        for i, (name, task) in enumerate(ctx.tasks.items())
    ]
    return Genome(components, nodes)


def split(system_prompt: str) -> tuple[str, ...]:
    """A prompt's sentences, the components that edits work on."""
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", system_prompt.strip()) if s)


def join(components: tuple[str, ...]) -> str:
    return " ".join(components)
