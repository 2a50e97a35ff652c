"""Errors that carry an exit code: 2 for bad usage or input, 1 for a failure during the run."""

from export.format import ArtifactError  # noqa: F401  (the runtime's own error; the CLI maps it to exit code 2)


class CompressError(Exception):
    """A failure during the run (exit code 1)."""

    exit_code = 1


class InputError(CompressError):
    """Bad usage or input: a recipe field, a file, a model folder, an artifact (exit code 2)."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe that does not validate; the message names the field path."""
