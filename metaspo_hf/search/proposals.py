"""Candidate prompts from the optimizer: rewrites from failures, or APE-style writing from demos.

Each function makes all its requests for one step in one optimizer batch per phase (analysis, then
rewrite), and returns None where the reply stayed unusable (the parent is then kept as it is).
User-prompt proposals return, per parent, a list of ``count`` candidates.
"""

from __future__ import annotations

from collections.abc import Callable

from ..scoring import WrongExample
from ..tasks.task import Example
from . import prompts
from .candidates import BilevelState, Node
from .context import SearchContext
from .parsing import shared_runs

# (ctx, parents, candidates per parent, iteration) -> per parent, its candidates (None = unusable).
ProposeUser = Callable[[SearchContext, list[Node], int, int], list[list[str | None]]]
# (ctx, state, candidates, iteration) -> system-prompt candidates (None = unusable).
ProposeSystem = Callable[[SearchContext, BilevelState, int, int], list[str | None]]


def rewrite_user_prompts(
    ctx: SearchContext, parents: list[Node], count: int, iteration: int
) -> list[list[str | None]]:
    """Failures of each parent -> analysis -> rewritten user prompt, ``count`` times per parent."""
    jobs = [
        (parent, _sample(ctx, parent.wrong, ctx.config.wrong_examples, iteration, "user", parent.id, j))
        for parent in parents
        for j in range(count)
    ]
    analysis_chats = [prompts.user_analysis(p.system_prompt, p.user_prompt, wrong, ctx.reply_limit) for p, wrong in jobs]
    analyses = ctx.writer.analyses(analysis_chats, iteration, "user")
    rewrite_chats = [
        prompts.user_rewrite(p.system_prompt, p.user_prompt, wrong, analysis, ctx.reply_limit)
        for (p, wrong), analysis in zip(jobs, analyses, strict=True)
    ]
    rewrites = ctx.writer.prompts(rewrite_chats, "user", iteration, "user",
                                  shown=[[w.question for w in wrong] for _, wrong in jobs],
                                  ignore=[task_wording(ctx, p.task) for p, _ in jobs])
    return _per_parent(rewrites, count)


def task_wording(ctx: SearchContext, task: str) -> frozenset:
    """What a task's training questions share (its instructions): a user prompt may restate it."""
    return shared_runs([ex.question for ex in ctx.train_examples(task)])


def rewrite_system_prompts(
    ctx: SearchContext, state: BilevelState, count: int, iteration: int
) -> list[str | None]:
    """Failures gathered across tasks -> analysis -> rewritten system prompt, ``count`` times; with
    ``search.system_focus``, candidate j looks at one kind of mistake (``system_foci_of``); with
    ``search.system_components``, pool sentences appended to the current prompt follow (``pool_sentences_of``)."""
    failure_sets = [gather_failures(ctx, state, iteration, j) for j in range(count)]
    foci = system_foci_of(ctx, iteration, count)
    analysis_chats = [prompts.system_analysis(state.system_prompt, failures, ctx.reply_limit, focus)
                      for failures, focus in zip(failure_sets, foci, strict=True)]
    analyses = ctx.writer.analyses(analysis_chats, iteration, "system")
    edit = ctx.config.system_edit
    rewrite_chats = [prompts.system_rewrite(state.system_prompt, analysis, ctx.reply_limit, edit, focus)
                     for analysis, focus in zip(analyses, foci, strict=True)]
    shown = [[w.question for _, w in failures] for failures in failure_sets]
    written = ctx.writer.prompts(rewrite_chats, "system", iteration, "system", shown=shown)
    if edit == "add":
        # The reply is one instruction, parsed like a prompt, appended to the current system prompt.
        written = [_appended(state.system_prompt, added) for added in written]
    proposals = [{"source": "optimizer", "focus": f, "system_prompt": text}
                 for f, text in zip(foci, written, strict=True)]
    pooled = pool_sentences_of(ctx, state.system_prompt, iteration)
    proposals += [{"source": "pool", "sentence": sentence, "system_prompt": _appended(state.system_prompt, sentence)}
                  for sentence in pooled]
    if ctx.config.system_focus or pooled:
        ctx.emit(iteration, "system_proposals", proposals=proposals)
    return [p["system_prompt"] for p in proposals]


def pool_sentences_of(ctx: SearchContext, system_prompt: str, iteration: int) -> list[str]:
    """The step's ``search.system_components`` sentences from the component pool, to append as candidates:
    a seeded order of the pool drawn once per run, each step taking the next ones the prompt lacks, so no
    sentence is tried twice in a run."""
    count = ctx.config.system_components
    if not count:
        return []
    pool = list(prompts.component_pool())
    ctx.rng("pool").shuffle(pool)
    step = pool[(iteration - 1) * count : iteration * count]
    return [sentence for sentence in step if sentence not in system_prompt]


def _appended(system_prompt: str, added: str | None) -> str | None:
    """The current prompt plus the instruction; a 1.5B optimizer often repeats the current prompt in its
    reply, which would otherwise be appended twice (None if nothing new is left)."""
    if added is None:
        return None
    if system_prompt:
        added = added.replace(system_prompt, "").strip()
    return f"{system_prompt} {added}".strip() if added else None


def system_foci_of(ctx: SearchContext, iteration: int, count: int) -> list[str | None]:
    """The kind of mistake each of a step's ``count`` candidates concentrates on: the foci in a seeded
    order, so that they differ and, with as many candidates as foci, cover every one (None without the key)."""
    if not ctx.config.system_focus:
        return [None] * count
    foci = prompts.system_foci()
    ctx.rng(iteration, "focus").shuffle(foci)
    return [foci[j % len(foci)] for j in range(count)]


def gather_failures(
    ctx: SearchContext, state: BilevelState, iteration: int, j: int
) -> list[tuple[str, WrongExample]]:
    """A few failures of each task's best user prompt, shuffled together (a fresh draw per candidate ``j``)."""
    rng = ctx.rng(iteration, "failures", j)
    failures = [
        (task, w)
        for task, beam in state.beams.items()
        for w in rng.sample(beam.best.wrong, min(ctx.config.wrong_examples_per_task, len(beam.best.wrong)))
    ]
    rng.shuffle(failures)
    return failures


def ape_user_prompts(
    ctx: SearchContext, parents: list[Node], count: int, iteration: int
) -> list[list[str | None]]:
    """User prompts written from input/output demos of each parent's task (the parent text is not shown)."""
    jobs = [(p, _demos(ctx, p.task, ctx.config.ape_demos, iteration, "user", p.id, j))
            for p in parents for j in range(count)]
    written = ctx.writer.prompts([prompts.ape_user(demos) for _, demos in jobs], "user", iteration, "user_ape",
                                 shown=[[ex.question for ex in demos] for _, demos in jobs],
                                 ignore=[task_wording(ctx, p.task) for p, _ in jobs])
    return _per_parent(written, count)


def ape_system_prompts(
    ctx: SearchContext, state: BilevelState, count: int, iteration: int
) -> list[str | None]:
    """System prompts written from demos of every task, mixed together."""
    chats, shown = [], []
    for j in range(count):
        demos = [
            ex for task in ctx.tasks for ex in _demos(ctx, task, ctx.config.ape_demos_per_task, iteration, j)
        ]
        ctx.rng(iteration, "mix", j).shuffle(demos)
        chats.append(prompts.ape_system(demos))
        shown.append([ex.question for ex in demos])
    return ctx.writer.prompts(chats, "system", iteration, "system_ape", shown=shown)


def resample_user_prompts(
    ctx: SearchContext, parents: list[Node], count: int, iteration: int
) -> list[list[str | None]]:
    """Paraphrases of each parent's user prompt (APE's resampling step); copies of one request sample apart."""
    chats = [prompts.ape_resample(p.user_prompt) for p in parents for _ in range(count)]
    return _per_parent(ctx.writer.prompts(chats, "user", iteration, "user_resample"), count)


def _sample(ctx: SearchContext, items: list, k: int, *parts: object) -> list:
    return ctx.rng(*parts).sample(items, min(k, len(items)))


def _demos(ctx: SearchContext, task: str, k: int, *parts: object) -> list[Example]:
    return _sample(ctx, ctx.train_examples(task), k, "demos", task, *parts)


def _per_parent(flat: list, count: int) -> list[list]:
    return [flat[i : i + count] for i in range(0, len(flat), count)]
