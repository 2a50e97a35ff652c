"""`compress` command line: parses, calls compress.api, prints. Exit codes: 0 ok, 2 bad usage or input, 1 failure.

compress.api (torch, transformers: seconds to import) is imported when a command runs, not when the module loads, so
that `compress --help` and a command's `--help` answer at once and a run's first line is not held back by imports
of code it has not reached."""

from __future__ import annotations

import functools
import json
import sys
from types import ModuleType

import click


def _api() -> ModuleType:
    from compress import api

    return api


def _errors(fn):
    """Turn our errors into a one-line message on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from compress.errors import ArtifactError, CompressError, InputError

        try:
            with _api().command_line():  # errors name our flags, not the Python arguments
                return fn(*args, **kwargs)
        except (InputError, ArtifactError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except CompressError as err:
            click.echo(f"failed: {err}", err=True)
            sys.exit(1)

    return wrapper


NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def _quiet_optional_imports() -> None:
    """Keep optional libraries' import noise out of a command's output, until the command ends: transformers imports
    torchao through its quantizers whenever it is installed (modeling_utils -> quantizers -> quantizer_torchao), and
    torchao then logs "Failed to load .../_C_mxfp8..." for CUDA extensions a CPU build lacks while torch's pytree logs
    deprecation warnings for torchao's enums; none concerns a `compress` user. Errors still show."""
    import logging

    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)

    def restore() -> None:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

    click.get_current_context().call_on_close(restore)


def _emit(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(str(result))


def _recipe(fn):
    """RECIPE as the argument or as --recipe/-r, the same for every command that reads a recipe: `compress run R`
    and `compress validate --recipe R` both work."""
    fn = click.option("--recipe", "-r", "recipe_option", default=None, metavar="RECIPE",
                      help="Recipe YAML file (or give it as the argument).")(fn)
    return click.argument("recipe", required=False, default=None)(fn)


def _one_recipe(argument: str | None, option: str | None) -> str:
    """The recipe given either way; a usage error (exit 2) for none, or for two different ones."""
    if argument and option and argument != option:
        raise click.UsageError(f"two recipes given, {argument} and --recipe {option}: give one")
    if not (argument or option):
        raise click.UsageError("missing the recipe: give it as RECIPE or --recipe RECIPE")
    return str(argument or option)


_set = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                    help="Override a recipe field, e.g. --set passes.0.target=0.2 (repeatable).")
_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compress-llm")
def cli() -> None:
    """Make Llama-family language models smaller and faster; export artifacts other stacks load."""
    _quiet_optional_imports()


@cli.command()
@_recipe
@click.option("--out", "-o", default=None, help="Artifact folder (default: artifacts/<recipe name>/).")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact folder (atomically).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run of the same --out; refused, naming what changed, if its inputs did.")
@_set
@_json
@_errors
def run(recipe, recipe_option, out, overwrite, resume, overrides, as_json) -> None:
    """Run a recipe: load, calibrate, apply passes, evaluate, export, reload and compare. Under
    `torchrun --nproc-per-node N` the processes share the work (compress.distributed); rank 0 logs and writes."""
    from compress import distributed

    recipe = _one_recipe(recipe, recipe_option)
    with distributed.session():
        main = distributed.is_main()
        log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
        result = _api().run(recipe, out=out, overwrite=overwrite, overrides=overrides,
                         log=log if main else lambda _m: None, resume=resume)
    if main:
        _emit(result, as_json)


@cli.command()
@_recipe
@_set
@_json
@_errors
def validate(recipe, recipe_option, overrides, as_json) -> None:
    """Check a recipe and its local paths without reading any weights or text."""
    recipe = _one_recipe(recipe, recipe_option)
    r = _api().validate(recipe, overrides=overrides)
    click.echo(json.dumps(r.to_dict(), indent=2) if as_json else f"{recipe}: OK\n{r.to_yaml()}")


@cli.command("eval")
@click.argument("artifact")
@click.option("--max-windows", type=int, default=None, help="Held-out windows per text (default: the recipe's).")
@_json
@_errors
def eval_(artifact, max_windows, as_json) -> None:
    """Dense source vs artifact: held-out perplexity, parameters, size on disk, CPU tokens/s."""
    _emit(_api().eval(artifact, max_windows=max_windows), as_json)


@cli.command()
@click.argument("artifact")
@_json
@_errors
def inspect(artifact, as_json) -> None:
    """Show what an artifact holds, layer by layer."""
    _emit(_api().inspect(artifact), as_json)


@cli.command()
@click.argument("artifact")
@_json
@_errors
def verify(artifact, as_json) -> None:
    """Check every file and tensor of an artifact against its manifest (exit 2 if any problem)."""
    result = _api().verify(artifact)
    _emit(result, as_json)
    if not result.ok:
        sys.exit(2)


@cli.command()
@click.argument("artifact")
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True, help="New tokens at most.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template as one user turn.")
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding (transformers' name).")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (with --do-sample).")
@click.option("--top-k", type=int, default=None, help="Sample from the k likeliest tokens (with --do-sample).")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (with --do-sample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@click.option("--kernel", type=click.Choice(["auto", "cpu", "dense", "reference"]), default="auto",
              show_default=True, help="Compute path of the quantized linears: cpu (torch's int4 kernel, bfloat16: "
              "fast, but greedy choices can flip at near-ties), reference (the oracle: dequantizes at every call), "
              "dense (the oracle's weights kept dequantized: the reference's tokens at a dense model's speed).")
@click.option("--draft", default="none", show_default=True, help="Speculate: heads (the artifact's Medusa heads), "
              "ngram (prompt lookup), model:PATH (an artifact or model with the same tokenizer drafts) or none; "
              "greedy output is unchanged, --json adds drafted, accepted and mean_accepted_length.")
@_json
@_errors
def generate(artifact, prompt, max_new_tokens, chat, do_sample, temperature, top_k, top_p, seed, kernel, draft,
             as_json) -> None:
    """Continue a prompt with an artifact (or a dense source model) on CPU; prints the text and tokens per second."""
    _emit(_api().generate(artifact, prompt, max_new_tokens=max_new_tokens, chat=chat, do_sample=do_sample,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, kernel=kernel, draft=draft),
          as_json)


def main() -> None:
    cli()


if __name__ == "__main__":  # `python -m compress.cli`, `torchrun -m compress.cli run ...`
    main()
