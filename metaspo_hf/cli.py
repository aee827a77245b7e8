"""The `metaspo` command. It parses arguments and calls the pipeline; it holds no logic of its own.

Errors caused by input (recipe, data, prompts, arguments) print one line and exit with code 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from . import __version__, pipeline
from .errors import MetaspoError
from .pipeline import RunInterrupted
from .tasks import commands


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file or name (see `metaspo ls`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set search.iterations=2 (repeatable)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", help="run folder (default: <output_dir>/<recipe>/<timestamp>/)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaspo", description="Meta-learned system prompt optimization (MetaSPO) "
                                     "with in-process Hugging Face models, offline.")
    parser.add_argument("--version", action="version", version=f"metaspo-hf {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("ls", help="list recipes, packaged models and task suites")

    p = sub.add_parser("validate", help="check a recipe (keys, types, values, model source, every task's data) "
                                         "without loading the model")
    _add_recipe_args(p)

    tasks = sub.add_parser("tasks", help="list and inspect tasks and suites")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    p = tasks_sub.add_parser("ls", help="list suites, or the tasks of one suite")
    p.add_argument("--suite", help="list this suite's tasks")
    p = tasks_sub.add_parser("show", help="sizes, one example, the initial prompt and the metric of a task")
    p.add_argument("name", help="registry name or bigbench:<task>[/<subtask>]")
    p.add_argument("--data-dir", help="folder of a reference-layout dataset")

    data = sub.add_parser("data", help="fetch datasets into the cache")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("fetch", help="download a dataset into the user cache (e.g. bigbench)",
                            epilog="bigbench: the bigbench-1.0.0 source archive from the package index; with "
                                   "$METASPO_BIGBENCH_ARCHIVE set, that local copy instead (docs/tasks.md).")
    p.add_argument("what", help="bigbench")

    p = sub.add_parser("generate", help="load a recipe's model and answer one question (a quick check)")
    _add_recipe_args(p)
    p.add_argument("question")
    p.add_argument("--system-prompt", default=None)

    p = sub.add_parser("train", help="meta-train a system prompt on the recipe's meta-train tasks")
    _add_recipe_args(p)
    _add_run_args(p)

    for name, text in (("evaluate", "unseen generalization of a system prompt vs the baselines"),
                       ("adapt", "test-time adaptation of user prompts under a system prompt")):
        p = sub.add_parser(name, help=text)
        _add_recipe_args(p)
        _add_run_args(p)
        p.add_argument("--system-prompt", required=True, action="append", metavar="FILE",
                       help="a text file holding the system prompt, or a JSON file with 'prompt' (the reference's "
                            "prompt files) or 'optimized_system_prompt' (a result file); repeat it to compare "
                            "several (the first is compared with every other, item by item)")
        p.add_argument("--tasks", nargs="+", help="tasks to use instead of the suite's meta-test tasks")

    p = sub.add_parser("reproduce", help="train, then both protocols on unseen tasks, then the report")
    _add_recipe_args(p)
    _add_run_args(p)

    p = sub.add_parser("report", help="(re)write report.md, CSVs and plots of a run folder")
    p.add_argument("run_dir")

    p = sub.add_parser("compare", help="pool several seeds of one recipe: mean ± sd and the paired interval "
                                       "(refuses runs whose tasks or settings differ beyond the seed)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True, help="folder for comparison.md, CSV and plot")

    p = sub.add_parser("bench", help="measure the engine against plain HF generate (and llama.cpp when present)")
    p.add_argument("--out", help="JSON file for the results (default: bench/results/<timestamp>.json)")
    p.add_argument("--quick", action="store_true", help="a smaller workload, for a smoke check")
    p.add_argument("--loglik", action="store_true",
                   help="add a section: `scoring: loglik` vs generation on multiple-choice questions (speed, agreement)")
    p.add_argument("--workloads", metavar="NAMES",
                   help="which to run, comma-separated, of w1,w2,w3,w4,parallel (default: all)")
    p.add_argument("--repeats", type=int, help="timed runs per variant, medians reported (default 3; 1 with --quick)")
    p.add_argument("--naive-runs", type=int, default=1,
                   help="timed runs of W1's slow one-chat-at-a-time variant (default 1; 0 skips it)")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="W1's int8 engine variants, torchao and bitsandbytes (default: on; each is skipped where "
                        "its library is missing)")
    p.add_argument("--w4-model", metavar="NAME",
                   help="W4's model (default: qwen2.5-coder-1.5b-instruct where `make install-models` installed "
                        "it, else the embedded smollm2-135m-instruct)")
    p.add_argument("--llama-formats", metavar="FORMATS",
                   help="the llama.cpp formats W3 and W4 run, comma-separated, of F16,BF16,Q8_0,Q4_0 (default: all)")
    return parser


def run_command(args: argparse.Namespace) -> None:
    command = args.command
    if command == "ls":
        pipeline.list_everything()
    elif command == "validate":
        pipeline.validate(args.recipe, args.overrides)
    elif command == "tasks":
        if args.tasks_command == "ls":
            commands.tasks_ls(args.suite)
        else:
            commands.tasks_show(args.name, data_dir=args.data_dir)
    elif command == "data":
        commands.data_fetch(args.what)
    elif command == "generate":
        print(pipeline.generate_one(args.recipe, args.overrides, args.question, args.system_prompt))
    elif command == "report":
        print(pipeline.report(args.run_dir))
    elif command == "compare":
        print(pipeline.compare(args.run_dirs, args.out))
    elif command == "bench":
        # Not at the top: the benchmark imports torch, which `metaspo --help` does without.
        from .bench import main as bench_main

        bench_main(out=args.out, quick=args.quick, loglik=args.loglik, workloads=args.workloads, repeats=args.repeats,
                   naive_runs=args.naive_runs, int8=args.int8, w4_model=args.w4_model,
                   llama_formats=args.llama_formats)
    else:
        phases = {"train": ("train",), "evaluate": ("evaluate",), "adapt": ("adapt",),
                  "reproduce": ("train", "evaluate", "adapt")}[command]
        run_dir = pipeline.run(args.recipe, args.overrides, phases=phases, output_dir=args.output_dir,
                               resume=args.resume, system_prompt_files=getattr(args, "system_prompt", None),
                               task_names=getattr(args, "tasks", None))
        # The run folder is always the last line, so scripts can capture it.
        print(run_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_command(args)
    except MetaspoError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"metaspo: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except RunInterrupted as stop:
        print(f"\nmetaspo: interrupted; finished work is saved in {stop.run_dir}. Continue with:\n"
              f"  metaspo {args.command} {args.recipe} {' '.join('--set ' + o for o in args.overrides)} "
              f"--resume {stop.run_dir}".rstrip(), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nmetaspo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
