"""The ``evomerge`` command line. User errors exit with code 2 and one line (traceback with ``-v``)."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from evomerge.errors import EvomergeError, RunStopped

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evolutionary search for LLM merge recipes.")
zoo_app = typer.Typer(no_args_is_help=True, help="The built-in tiny model zoo.")
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

_state = {"verbose": False}


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logging and full tracebacks.")] = False,
) -> None:
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def user_errors(fn: F) -> F:
    """Turn an EvomergeError into one line on stderr and exit code 2 (traceback only with -v)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EvomergeError as exc:
            if _state["verbose"]:
                console.print_exception()
            if isinstance(exc, RunStopped):
                console.print(f"[bold yellow]stopped:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None
            console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def load_recipe_file(path: Path) -> Any:
    """Read an evomerge recipe YAML or a mergekit YAML (detected by ``merge_method``)."""
    import yaml

    from evomerge.builtin import read_text
    from evomerge.errors import ConfigError
    from evomerge.mergekit_compat import from_mergekit_yaml
    from evomerge.recipe import Recipe

    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    text = read_text(path)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(doc, dict) and "merge_method" in doc:
        return from_mergekit_yaml(text, base_dir=path.parent)
    from pydantic import ValidationError

    from evomerge.config.load import format_validation_error

    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    # relative source paths are relative to the recipe file
    from evomerge.io.adapter import resolve_spec

    fixed = {k: resolve_spec(v, path.parent) for k, v in recipe.sources.items()}  # BASE+ADAPTER: both sides
    return recipe.model_copy(update={"sources": fixed})


@app.command()
@user_errors
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (evomerge or mergekit format).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist or be empty).")],
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    device: Annotated[str, typer.Option(help="Device to merge on (cpu, cuda, cuda:1).")] = "cpu",
    stats_dir: Annotated[Path | None, typer.Option(
        help="Cache of calibration statistics for data-informed recipes (fisher, regmean, AIM); "
        "default: OUT.stats beside the output folder.")] = None,
) -> None:
    """Materialize a recipe into a Hugging Face folder, streaming tensor by tensor.

    A recipe whose method reads calibration statistics (its ``data:`` block names the suite) has them
    computed once per source and example set, or loaded from the cache when its inputs are unchanged.
    """
    from evomerge.merge.materialize import _open_sources, materialize_to_disk
    from evomerge.merge.stats import recipe_kinds, recipe_stats

    r = load_recipe_file(recipe)
    stats = None
    if recipe_kinds(r):
        folders = {m: f.path for m, f in _open_sources(r, None).items()}
        cache = stats_dir if stats_dir is not None else out.with_name(out.name + ".stats")
        stats, records = recipe_stats(r, folders, cache, device=device)
        for rec in records:
            typer.echo(f"statistics {'computed' if rec.computed else 'loaded'}: {rec.path} ({rec.seconds:.1f}s)")
    out_path = materialize_to_disk(
        r, out, max_shard_bytes=parse_size(shard_size), overwrite=overwrite, device=device, stats=stats
    )
    typer.echo(f"wrote {out_path} (recipe {r.hash})")


def parse_size(text: str, option: str = "--shard-size") -> int:
    from evomerge.errors import ConfigError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise ConfigError(f"{option}: cannot read {text!r} (e.g. 5GB, 500MB, 80GiB)") from None


@zoo_app.command("build")
@user_errors
def zoo_build(
    out: Annotated[Path, typer.Argument(help="Folder to build the zoo in.")],
    size: Annotated[str, typer.Option(
        help="test (fast, for the test suite) or demo: the tiny zoo; real (SmolLM2-135M, needs evomerge[real]) "
             "or real-test (its first layers, for tests).")] = "demo",
    seed: Annotated[int, typer.Option(help="Seed: the same seed builds the same zoo.")] = 0,
) -> None:
    """Build a model zoo (base, experts, multitask) on this machine."""
    from evomerge.testing.zoo import build_zoo

    manifest = build_zoo(out, size=size, seed=seed)
    from evomerge.testing.real import RealManifest, manifest_summary

    if isinstance(manifest, RealManifest):
        typer.echo(manifest_summary(manifest))
    else:
        typer.echo(manifest_table(manifest))


def manifest_table(manifest: Any) -> str:
    import json

    data = manifest if isinstance(manifest, dict) else getattr(manifest, "__dict__", {})
    return json.dumps(data, indent=2, default=str)


space_app = typer.Typer(no_args_is_help=True, help="Search spaces.")
app.add_typer(space_app, name="space")


def _progress_printer(total: int | None) -> Any:
    """A rich progress bar fed by the driver's per-evaluation callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[best]}"), console=console, transient=False)
    task = prog.add_task("search", total=total, best="", start=False)

    def update(info: dict[str, Any]) -> None:
        if not prog.live.is_started:  # the bar appears with the first result, after the preflight
            prog.start()
            prog.start_task(task)
        best = info.get("best")
        prog.update(task, completed=info["told"], best=f"best {best:.3f}" if best is not None else "")

    return prog, update


def _finish(run_dir: Path, export: bool) -> None:
    from evomerge.report import write_report
    from evomerge.results import RunResults

    res = RunResults(run_dir)
    write_report(run_dir)  # a run whose every evaluation failed stops here, naming the first error
    if export and res.best() is not None:
        from evomerge.export import export_run

        export_run(run_dir, pick="best", overwrite=True)
    typer.echo(f"\nrun folder: {run_dir}\n")
    typer.echo("held-out test split (scores per task; 'rel. expert' = score / best source's score):\n")
    typer.echo(res.markdown_table("test"))


@app.command()
@user_errors
def run(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    name: Annotated[str | None, typer.Option(help="Override the run name.")] = None,
    evaluations: Annotated[int | None, typer.Option(help="Override the evaluation budget.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster (ray backend).")] = None,
    export: Annotated[bool, typer.Option(help="Export the best merge at the end.")] = True,
) -> None:
    """Start a search: preflight, baselines, search, test re-scoring, report, export."""
    from evomerge.config import load_run_config
    from evomerge.driver.run import start_run

    overrides: dict[str, Any] = {}
    if name:
        overrides["name"] = name
    if seed is not None:
        overrides["seed"] = seed
    if evaluations is not None:
        overrides["budget"] = {"evaluations": evaluations}
    if address:
        overrides["resources"] = {"backend": "ray", "address": address}
    cfg = load_run_config(config, overrides)
    prog, update = _progress_printer(cfg.budget.evaluations)
    try:
        run_dir = start_run(cfg, on_progress=update)
    finally:
        prog.stop()
    _finish(run_dir, export)


@app.command()
@user_errors
def adamerge(
    config: Annotated[Path, typer.Argument(help="Run config YAML (its sources, space, suite and seed).")],
    steps: Annotated[int, typer.Option(help="Adam steps.")] = 30,
    lr: Annotated[float, typer.Option(help="Adam learning rate, in genome units.")] = 0.01,
    objective: Annotated[str, typer.Option(
        help="entropy (of the model's own answers, unlabeled) or likelihood (of the reference answers).")] = "entropy",
    refresh: Annotated[int | None, typer.Option(
        help="Regenerate the greedy continuations every N steps (entropy; default 3).")] = None,
    subset: Annotated[int | None, typer.Option(help="Examples per task at each step (default: all).")] = None,
    balance: Annotated[float | None, typer.Option(
        help="Weigh tasks by a softmax (this temperature) of their loss relative to the start.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per forward pass (default: fitness.batch_size).")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: OUTPUT_DIR/adamerging-NAME).")] = None,
    score: Annotated[bool, typer.Option(help="Score the start and fitted recipes on calibration.")] = True,
) -> None:
    """Fit the config's task-arithmetic space by AdaMerging (gradient descent on the entropy of the merged model's
    answers to the calibration prompts, or on the likelihood of their reference answers); writes recipe.yaml,
    start.json (for space.start_from), log.jsonl and summary.json."""
    import json

    from evomerge.driver.adamerging import AdaMergingConfig, run_adamerging
    from evomerge.errors import ConfigError

    try:
        given = {"refresh": refresh} if refresh is not None else {}
        settings = AdaMergingConfig(objective=objective, steps=steps, lr=lr, subset=subset, balance=balance,
                                    batch_size=batch_size, **given)
    except ValueError as exc:
        err = exc.errors()[0]
        where = f"{err['loc'][0]}: " if err["loc"] else ""
        raise ConfigError(f"adamerge options: {where}{err['msg'].removeprefix('Value error, ')}") from None

    def show(rec: dict[str, Any]) -> None:
        typer.echo(f"step {rec['step']:4d}  {objective} {rec['loss']:.4f}", err=True)

    folder = run_adamerging(config, settings, out, score=score, progress=show)
    summary = json.loads((folder / "summary.json").read_text())
    cost = summary["cost"]
    typer.echo(f"wrote {folder}: {objective} {summary['loss']['start']:.4f} -> {summary['loss']['fitted']:.4f}, "
               f"{cost['fit_s']:.1f} s" + (f" = {cost['evaluations']:.1f} evaluations" if cost["evaluations"] else ""))
    for label, means in summary["calibration"].items():
        typer.echo(f"  {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


@app.command()
@user_errors
def plan(
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    shapes_from: Annotated[str | None, typer.Option(
        help="Plan for a reference of these shapes instead of reading the sources' headers (no weights needed): "
             "llama-7b, mistral-7b, llama-3-8b, qwen2.5-32b or llama-3-70b.")] = None,
    assume_gpu_memory: Annotated[str | None, typer.Option(
        help="Plan for CUDA workers on GPUs of this size (e.g. 80GiB) instead of this machine's memory.")] = None,
) -> None:
    """The memory each worker keeps resident (sources, task vectors, magnitude orders, live model, vLLM) and
    whether it fits; exit 2 with the smallest change that makes it fit when it does not."""
    from rich.console import Console as RichConsole

    from evomerge.config import load_run_config
    from evomerge.driver import plan as memory

    cfg = load_run_config(config)
    gpu = parse_size(assume_gpu_memory, "--assume-gpu-memory") if assume_gpu_memory is not None else None
    shapes = memory.shapes_from(shapes_from) if shapes_from is not None else None
    p = memory.plan_run(cfg, shapes=shapes, assume_gpu_memory=gpu)
    out = RichConsole(width=140)
    out.print(p.table())
    for note in p.notes:
        out.print(f"note: {note}", highlight=False, soft_wrap=True)
    if p.fits is False:
        console.print(f"[bold red]error:[/] {memory.no_fit_line(p)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    out.print(p.verdict(), highlight=False, soft_wrap=True)


@app.command()
@user_errors
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run folder to continue.")],
    export: Annotated[bool, typer.Option(help="Export the best merge at the end.")] = True,
) -> None:
    """Continue a stopped or killed run where it stopped (nothing lost, nothing repeated)."""
    from evomerge.config.load import load_run
    from evomerge.driver.run import resume_run

    cfg = load_run(run_dir)
    prog, update = _progress_printer(cfg.budget.evaluations)
    try:
        resume_run(run_dir, on_progress=update)
    finally:
        prog.stop()
    _finish(run_dir, export)


@app.command()
@user_errors
def status(run_dir: Annotated[Path, typer.Argument(help="Run folder.")]) -> None:
    """Progress, best per task, front size, hypervolume, failures."""
    import json

    from evomerge.results import RunResults

    typer.echo(json.dumps(RunResults(run_dir).status(), indent=2))


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    pick: Annotated[str, typer.Option(help="best, pareto, or a candidate id.")] = "best",
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/export).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export.")] = False,
) -> None:
    """Write the merged model(s), recipe.yaml, mergekit.yaml and a model card."""
    from evomerge.export import export_run

    for path in export_run(run_dir, pick=pick, out=out, overwrite=overwrite):
        typer.echo(f"exported {path}")


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/report).")] = None,
) -> None:
    """PNG plots (Pareto front, best and hypervolume over evaluations) and a markdown table."""
    from evomerge.report import write_report

    typer.echo(f"report written to {write_report(run_dir, out)}")


@space_app.command("describe")
@user_errors
def space_describe(
    template: Annotated[str, typer.Argument(help="builtin:NAME or a search-space YAML.")],
    models: Annotated[list[Path], typer.Option("--models", "-m", help="Source model folders (repeat).")],
    base: Annotated[str | None, typer.Option(help="Name (folder name) of the base model.")] = None,
) -> None:
    """Print every gene of a search space for these models: what it controls, its range, its transform."""
    from evomerge.io import ModelFolder
    from evomerge.spaces.base import SpaceModels, build_space
    from evomerge.spaces.template import load_template

    folders = {p.name: ModelFolder.open(p) for p in models}
    space = build_space(load_template(template), SpaceModels.from_folders(folders, base=base))
    typer.echo(space.describe())


@app.command("schema")
def schema() -> None:
    """Print the run config's JSON schema."""
    import json

    from evomerge.config import RunConfig

    typer.echo(json.dumps(RunConfig.model_json_schema(), indent=2))


def main() -> None:  # pragma: no cover
    app(prog_name="evomerge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
