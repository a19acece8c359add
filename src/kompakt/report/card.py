"""The model card (README.md with YAML front matter) written into an exported model directory."""

from __future__ import annotations

from pathlib import Path

import yaml

from kompakt.export.public import public_model_name, public_recipe_yaml, scrub_paths
from kompakt.model.loaded import LoadedModel
from kompakt.report.document import comparison_rows, final_attempt
from kompakt.report.recipe_view import annotated_recipe


def _relation(report: dict) -> str:
    """Hugging Face's base_model_relation: "quantized" when only quantization ran, else "finetune"
    (pruned and distilled weights are derived weights, which the Hub calls a fine-tune)."""
    names = [name for step in final_attempt(report)["steps"] for name in step]
    return "quantized" if names and all(name.startswith("quant.") for name in names) else "finetune"


def model_card(report: dict, base_model: LoadedModel | str | Path | None) -> str:
    """The card of a `compress --target` result. It is shared with the model, so it names the base
    model (the original, or what loaded it) by its hub id or name and the recipe's data by file
    name and sha256 (never a local path); the recipe says what each `null` meant, as the report's."""
    plan = report["plan"]
    base_model = public_model_name(base_model)
    encoder = (report.get("comparison") or {}).get("kind") == "encoder"  # loads with SentenceTransformer(dir)
    front = {
        "base_model": base_model,
        "base_model_relation": _relation(report),
        "library_name": "sentence-transformers" if encoder else "transformers",
        "pipeline_tag": "sentence-similarity" if encoder else "text-generation",
        "tags": ["kompakt", "compressed", "small-language-model"] + sorted(
            {name.split(".")[0] for step in final_attempt(report)["steps"] for name in step}),
    }  # fmt: skip
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {base_model}, made small with kompakt", "", report["outcome"], ""]  # fmt: skip
    comparison = report.get("comparison")
    if comparison:
        lines += ["## Original vs this model", "", "| | original | this model | change |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(comparison)] + [""]
        lines += [f"- {note}" for note in comparison.get("notes", [])] + [""]
    exports = report.get("exports") or {}
    if exports.get("gguf_tensor_types"):  # each tensor's GGUF type, grouped, and where they came from
        lines += ["## GGUF tensor types", "", exports["gguf_tensor_types"], ""]
        lines += [f"({exports['gguf_tensor_types_source']})", ""] if exports.get("gguf_tensor_types_source") else []
    checks = {k.removesuffix("_check"): v for k, v in exports.items() if k.endswith("_check")}
    if checks:
        lines += ["## Checked after export", ""] + [f"- {kind}: {line}" for kind, line in checks.items()] + [""]
    recipe = annotated_recipe(public_recipe_yaml(report["recipe_yaml"]))  # says what each null meant
    lines += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", "",
              "Made with `kompakt compress --target " + plan["target"]["text"] + "`."]  # fmt: skip
    return scrub_paths("\n".join(lines) + "\n")  # notes may quote an error message that names a path
