"""What `kompakt passes show` prints: a pass's fields (type, default, doc) and a sample step."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from typing import Any

import yaml

# "Sample recipe step::" (or "steps::") followed by an indented block of YAML list items.
_SAMPLE = re.compile(r"Sample recipe steps?::\s*\n((?:[ \t]*\n|[ \t]+- .*\n?)+)")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return str(field.default_factory())  # type: ignore[misc]
    return "(required)"


def _samples(spec: Any) -> list[dict[str, Any]]:
    """The sample steps from the pass docstring (`Sample recipe step::` block), else defaults."""
    match = _SAMPLE.search(spec.doc or "")
    if match:
        try:
            parsed = yaml.safe_load(textwrap.dedent(match.group(1)))
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list) and parsed and all(isinstance(item, dict) and len(item) == 1 for item in parsed):
            return parsed
    return [{spec.name: {}}]


def _cli_value(value: Any) -> str:
    """A config value as `--step` writes it (Step.parse reads it back): lists and mappings as flow
    YAML (`[2, 4]`, `{a: 1}`), text that a comma would split or a bracket or quote would start
    quoted, the rest as written in YAML."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        plain = list(value) if isinstance(value, tuple) else value
        flow = yaml.safe_dump(plain, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
        # JSON is flow YAML too, and its double quotes sit inside the shell's single quotes
        return json.dumps(plain) if "'" in flow else flow
    text = str(value)
    if isinstance(value, str) and ("," in text or text[:1] in "[{\"'" or text.lower() in ("null", "none")):
        return json.dumps(text)  # a JSON string is a YAML double-quoted scalar
    return text


def _cli(step: dict[str, Any]) -> str:
    (name, config), = step.items()
    pairs = ",".join(f"{key}={_cli_value(value)}" for key, value in (config or {}).items())
    return f"{name}:{pairs}" if pairs else name


def _calibration_need(spec: Any) -> str:
    """'calibration data', and when some settings need none, which (the first line of the config's
    `uses_calibration` docstring)."""
    settings = getattr(spec.config, "uses_calibration", None)
    note = (settings.__doc__ or "").strip().splitlines()[0].rstrip(".") if settings else ""
    return f"calibration data ({note[:1].lower()}{note[1:]})" if note else "calibration data"


def describe_pass(name: str) -> dict[str, Any]:
    """Name, summary, needs, fields [{name, type, default, doc}], sample steps (YAML and CLI lists), doc.

    Raises:
        ConfigError: unknown pass (the message lists the available ones).
    """
    from kompakt.passes.base import get_pass

    spec = get_pass(name)
    fields = [
        {
            "name": f.name,
            "type": f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)),
            "default": _default(f),
            "doc": f.metadata.get("doc", ""),
        }
        for f in dataclasses.fields(spec.config)
    ]
    needs = [label for flag, label in (
        (spec.needs_calibration, _calibration_need(spec)), (spec.needs_teacher, "the original as teacher"),
        (spec.needs_training, "training"), (spec.changes_architecture, "changes the architecture"),
        (bool(spec.decoder_only), "a causal LM (not a sentence encoder)"),
        (bool(spec.dense_only), "a dense model (not a Mixture of Experts)"),
    ) if flag]  # fmt: skip
    samples = _samples(spec)
    flow = [yaml.safe_dump([sample], default_flow_style=None, sort_keys=False, width=1000).strip() for sample in samples]
    return {
        "name": spec.name,
        "summary": spec.summary,
        "needs": needs,
        "fields": fields,
        "sample_yaml": flow,
        "sample_cli": [_cli(sample) for sample in samples],
        "doc": (spec.doc or "").strip(),
    }
