"""What a run reports: each pass's table and summary (PassReport), the run's result (RunResult), its size rows and
the model card."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.evaluate import PPL_PROTOCOL
from compress.recipe import Recipe
from compress.tables import html_table, markdown_table, text_table


@dataclass
class PassReport:
    """What a pass did: one row per layer for the table, a summary, and any fallback it had to take."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "summary": self.summary, "fallbacks": self.fallbacks,
                "seconds": round(self.seconds, 2), "rows": self.rows}


@dataclass
class RunResult:
    """What `compress run` produced: the artifact folder and its report."""

    artifact: Path
    report: dict

    def quality_rows(self) -> list[dict]:
        return self.report.get("quality", [])

    def summary_rows(self) -> list[dict]:
        return summary_rows(self.report)

    def phase_rows(self) -> list[dict]:
        """Seconds per phase of the run, in order (the passes' own phases included)."""
        return [{"phase": name, "seconds": s} for name, s in self.report.get("phases", {}).items()]

    def __str__(self) -> str:
        r = self.report
        parts = [f"artifact: {self.artifact}", text_table(self.summary_rows())]
        if self.quality_rows():
            parts.append(text_table(self.quality_rows()))
        if self.phase_rows():
            parts.append(text_table(self.phase_rows()))
        if generation_rows(r):
            parts.append(text_table(generation_rows(r)))
        parts += [f"warning: {w}" for w in quality_warnings(r)]
        parts.append(f"reload max |logit diff| {r['verify']['max_abs_logit_diff']:.2e}; stock config: "
                     f"{'yes' if r['stock_config'] else 'no (' + r['stock_config_reason'] + ')'}; "
                     f"{r['seconds']:.0f} s; peak memory {r['peak_memory_mb']:.0f} MB")
        return "\n\n".join(parts)

    def _repr_html_(self) -> str:
        return (f"<p>artifact: <code>{self.artifact}</code></p>" + html_table(self.summary_rows(), title="size")
                + html_table(self.quality_rows(), title="held-out perplexity")
                + html_table(self.phase_rows(), title="time per phase"))

    def to_dict(self) -> dict:
        return {"artifact": str(self.artifact), **self.report}


# dense / compressed perplexity below this (perplexity more than tripled): the model has lost most of what it knew on
# that text (4-bit GPTQ on the default model out of domain: 0.49, FLAP at 30%: 0.10)
RECOVERY_FLOOR = 1 / 3


def quality_warnings(report: dict) -> list[str]:
    """A plain sentence per evaluated text on which the compressed model's perplexity is more than 1 / RECOVERY_FLOOR
    times the dense one's, with what to try."""
    lost = [q for q in report.get("quality", []) if q["recovery"] < RECOVERY_FLOOR]
    return [f"the compressed model has lost most of what it knew on {q['text']}: perplexity {q['dense ppl']} -> "
            f"{q['compressed ppl']} (recovery {q['recovery']}, below {RECOVERY_FLOOR:.2f}). Try a smaller target, a "
            "search that chooses the structure on the whole model (pass: tyr), quantization instead of pruning at "
            "the same size (recipes/llama-w4.yaml), or calibration text closer to this one" for q in lost]


def generation_rows(report: dict) -> list[dict]:
    """Greedy continuations of the same prompts by the dense and the compressed model, one row per prompt."""
    def shown(text: str) -> str:
        return text.replace("\n", "\u23ce ").strip()  # one line per cell

    return [{"prompt": g["prompt"], "dense": shown(g["dense"]), "compressed": shown(g["compressed"])}
            for g in report.get("generations", [])]


def summary_rows(report: dict) -> list[dict]:
    """Dense vs compressed size: decoder and all parameters, weights MB, bits per quantized weight as stored (low-rank
    corrections included), the correction's adapter and the drafter heads when there are any."""
    r = report
    return [
        {"": "decoder params", "dense": r["decoder_params"]["dense"], "compressed": r["decoder_params"]["compressed"]},
        {"": "all params", "dense": r["params"]["dense"], "compressed": r["params"]["compressed"]},
        {"": "weights MB", "dense": round(r["weights_bytes"]["dense"] / 2**20, 1),
         "compressed": round(r["weights_bytes"]["compressed"] / 2**20, 1)},
    ] + ([{"": "bits per quantized weight", "dense": "", "compressed": r["bits_per_weight"]["stored"]}]
         if r.get("bits_per_weight") else []) + ([{"": "low-rank correction", "dense": "", "compressed": (
             f"{a['modules']} modules, rank {'/'.join(map(str, a['ranks']))}, {a['bytes'] / 2**20:.2f} MB in "
             f"{a['path']}/ (PEFT LoRA)")}] if (a := r.get("adapter")) else []) + ([{"": "drafter heads", "dense": "",
         "compressed": f"{h['num_heads']} Medusa heads x {h['num_layers']} layer(s), {h['bytes'] / 2**20:.2f} MB "
                       f"in {h['path']}/ (vLLM Medusa drafter)"}] if (h := r.get("heads")) else [])


def _card_passes(passes: list[dict]) -> list[str]:
    """Per pass: its per-layer table (widths kept, bits chosen, errors) and any fallback it recorded."""
    lines = []
    for i, rep in enumerate(passes):
        lines += [f"## passes[{i}]: {rep['name']} ({rep['seconds']:.0f} s)", ""]
        if rep.get("rows"):
            lines += [markdown_table(rep["rows"]), ""]
        if rep.get("fallbacks"):
            lines += ["Fallbacks:", "", *[f"- {f}" for f in rep["fallbacks"]], ""]
    return lines


def model_card(recipe: Recipe, identity: str, report: dict) -> str:
    """README.md of the artifact: results, protocol, size, per-pass tables, how to load it, the recipe."""
    lines = [
        f"# {recipe.name}",
        "",
        f"Compressed from **{identity}** with `compress` ({', '.join(p['name'] for p in report['passes'])}).",
        "",
        "## Results",
        "",
        markdown_table(report["quality"]) if report["quality"] else "(evaluation disabled)",
        "",
        *[f"**Warning:** {w}.\n" for w in quality_warnings(report)],
        f"Perplexity protocol: {PPL_PROTOCOL}; seq_len {recipe.evaluate.seq_len}, "
        f"at most {recipe.evaluate.max_windows} windows per text. Recovery = dense / compressed perplexity.",
        "",
        markdown_table(summary_rows(report)),
        "",
        *(["## Generations", "", f"Greedy, {recipe.evaluate.new_tokens} new tokens (\u23ce: a new line).", "",
           markdown_table(generation_rows(report)), ""] if report.get("generations") else []),
        *_card_passes(report["passes"]),
        "## Loading",
        "",
        "```python",
        "import export",
        "model = export.load('PATH')  # our runtime; any structure",
        "```",
    ]
    if report["stock_config"]:
        lines += ["", "Stock transformers reads it too: `AutoModelForCausalLM.from_pretrained('PATH')`."]
    else:
        lines += ["", f"Not a stock transformers layout: {report['stock_config_reason']}."]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
