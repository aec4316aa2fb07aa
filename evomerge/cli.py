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

from evomerge.errors import EvomergeError

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
            console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def load_recipe_file(path: Path) -> Any:
    """Read an evomerge recipe YAML or a mergekit YAML (detected by ``merge_method``)."""
    import yaml

    from evomerge.errors import ConfigError
    from evomerge.mergekit_compat import from_mergekit_yaml
    from evomerge.recipe import Recipe

    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(doc, dict) and "merge_method" in doc:
        return from_mergekit_yaml(text, base_dir=path.parent)
    try:
        recipe = Recipe.model_validate(doc)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    # relative source paths are relative to the recipe file
    fixed = {
        k: (str(path.parent / v) if not Path(v).expanduser().is_absolute() else v) for k, v in recipe.sources.items()
    }
    return recipe.model_copy(update={"sources": fixed})


@app.command()
@user_errors
def merge(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (evomerge or mergekit format).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist or be empty).")],
    shard_size: Annotated[str, typer.Option(help="Maximum shard size, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    device: Annotated[str, typer.Option(help="Device to merge on (cpu, cuda, cuda:1).")] = "cpu",
) -> None:
    """Materialize a recipe into a Hugging Face folder, streaming tensor by tensor."""
    from evomerge.merge.materialize import materialize_to_disk

    r = load_recipe_file(recipe)
    out_path = materialize_to_disk(
        r, out, max_shard_bytes=parse_size(shard_size), overwrite=overwrite, device=device
    )
    typer.echo(f"wrote {out_path} (recipe {r.hash})")


def parse_size(text: str) -> int:
    from evomerge.errors import ConfigError

    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise ConfigError(f"--shard-size: cannot read {text!r} (e.g. 5GB, 500MB)") from None


@zoo_app.command("build")
@user_errors
def zoo_build(
    out: Annotated[Path, typer.Argument(help="Folder to build the zoo in.")],
    size: Annotated[str, typer.Option(help="test (fast, for the test suite) or demo.")] = "demo",
    seed: Annotated[int, typer.Option(help="Seed: the same seed builds the same zoo.")] = 0,
) -> None:
    """Build the tiny model zoo (base, experts, multitask) on this machine."""
    from evomerge.testing.zoo import build_zoo

    manifest = build_zoo(out, size=size, seed=seed)
    typer.echo(manifest_table(manifest))


def manifest_table(manifest: Any) -> str:
    import json

    data = manifest if isinstance(manifest, dict) else getattr(manifest, "__dict__", {})
    return json.dumps(data, indent=2, default=str)


def main() -> None:  # pragma: no cover
    app(prog_name="evomerge")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
