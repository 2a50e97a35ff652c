"""`compress` command line: parses, calls compress.api, prints. Exit codes: 0 ok, 2 bad usage or input, 1 failure."""

from __future__ import annotations

import functools
import json
import sys

import click

from compress import api
from compress.errors import ArtifactError, CompressError, InputError


def _errors(fn):
    """Turn our errors into a one-line message on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, ArtifactError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except CompressError as err:
            click.echo(f"failed: {err}", err=True)
            sys.exit(1)

    return wrapper


def _emit(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(str(result))


_set = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                    help="Override a recipe field, e.g. --set passes.0.target=0.2 (repeatable).")
_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compress-llm")
def cli() -> None:
    """Make Llama-family language models smaller and faster; export artifacts other stacks load."""


@cli.command()
@click.option("--recipe", "-r", required=True, help="Recipe YAML file.")
@click.option("--out", "-o", default=None, help="Artifact folder (default: artifacts/<recipe name>/).")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact folder (atomically).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run of the same --out; refused, naming what changed, if its inputs did.")
@_set
@_json
@_errors
def run(recipe, out, overwrite, resume, overrides, as_json) -> None:
    """Run a recipe: load, calibrate, apply passes, evaluate, export, reload and compare."""
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    result = api.run(recipe, out=out, overwrite=overwrite, overrides=overrides, log=log, resume=resume)
    _emit(result, as_json)


@cli.command()
@click.argument("recipe")
@_set
@_json
@_errors
def validate(recipe, overrides, as_json) -> None:
    """Check a recipe without reading any model."""
    r = api.validate(recipe, overrides=overrides)
    click.echo(json.dumps(r.to_dict(), indent=2) if as_json else f"{recipe}: OK\n{r.to_yaml()}")


@cli.command("eval")
@click.argument("artifact")
@click.option("--max-windows", type=int, default=None, help="Held-out windows per text (default: the recipe's).")
@_json
@_errors
def eval_(artifact, max_windows, as_json) -> None:
    """Dense source vs artifact: held-out perplexity, parameters, size on disk, CPU tokens/s."""
    _emit(api.eval(artifact, max_windows=max_windows), as_json)


@cli.command()
@click.argument("artifact")
@_json
@_errors
def inspect(artifact, as_json) -> None:
    """Show what an artifact holds, layer by layer."""
    _emit(api.inspect(artifact), as_json)


@cli.command()
@click.argument("artifact")
@_json
@_errors
def verify(artifact, as_json) -> None:
    """Check every file and tensor of an artifact against its manifest (exit 2 if any problem)."""
    result = api.verify(artifact)
    _emit(result, as_json)
    if not result.ok:
        sys.exit(2)


def main() -> None:
    cli()
