"""Recipe: model, calibration, passes, export, evaluate, seed; YAML loading with clear errors; `--set` overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compress.errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CalibrationConfig(_Strict):
    """Where calibration text comes from and how it is cut into token windows."""

    source: str = "pydoc"  # packaged default corpus, or a local .txt/.jsonl/.parquet/.arrow file or folder
    field: str | None = None  # the text field of .jsonl / parquet / arrow rows
    windows: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)


class EvaluateConfig(_Strict):
    """Held-out perplexity protocol: non-overlapping windows of seq_len over each named text."""

    seq_len: int = Field(256, ge=8)
    max_windows: int = Field(32, ge=1)
    # held-out part of the calibration source is always evaluated; these are other domains
    extra: list[str] = ["licenses"]
    enabled: bool = True


class ExportConfig(_Strict):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    shard_size_mb: float = Field(2000, gt=0)


class _PruneBase(_Strict):
    target: float = Field(..., gt=0.0, lt=1.0, description="share of decoder-block projection parameters removed")
    structure: Literal["adaptive", "uniform"] = "adaptive"
    round_to: int = Field(8, ge=1, description="uniform structure: MLP widths are a multiple of this")

    @field_validator("target")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("target must be in (0, 1)")
        return v


class FlapConfig(_PruneBase):
    """FLAP (An et al., 2024): fluctuation metric, standardized scores, one global threshold, bias compensation."""

    pass_: Literal["flap"] = Field("flap", alias="pass")
    metric: Literal["wifv", "ifv", "wifn"] = "wifv"
    compensate: bool = True
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class WandaSpConfig(_PruneBase):
    """Wanda-style structured baseline: |W| x input norm per channel, uniform widths, no compensation."""

    pass_: Literal["wanda_sp"] = Field("wanda_sp", alias="pass")
    structure: Literal["adaptive", "uniform"] = "uniform"
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


PassConfig = Annotated[Union[FlapConfig, WandaSpConfig], Field(discriminator="pass_")]


class Recipe(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = "smollm2-135m"
    seed: int = 0
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[PassConfig] = Field(..., min_length=1)
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data as it would be written in YAML (`pass:` keys, not `pass_`)."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- YAML loading -------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise RecipeError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                f"(first at line {seen[key] + 1})"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _format_validation(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if p not in ("flap", "wanda_sp"))
        path = path.replace("pass_", "pass")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {path or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Validate plain data into a Recipe; errors name the field path."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, where)) from None


def read_recipe_data(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.0.c=value` to nested plain data in place; unknown keys fail validation afterwards."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. passes.0.target=0.2")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {here}: no such list item (the list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            # unknown keys are created here and refused by validation, which names the path
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"--set {key}: {here}: cannot descend into a {type(node).__name__}")


def load_recipe(source: str | Path | dict | Recipe, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe from a YAML path, plain data, or a Recipe, then apply `--set` overrides."""
    if isinstance(source, Recipe):
        data, where = source.to_dict(), f"recipe {source.name}"
    elif isinstance(source, dict):
        data, where = source, "recipe"
    else:
        data, where = read_recipe_data(source), str(source)
    data = copy.deepcopy(data)
    for item in overrides:
        apply_override(data, item)
    return parse_recipe(data, where)
