"""Public names: how shared artifacts (GGUF metadata, model card, exported recipe) name a model
and a data file, so no local path (home directory, cache, run directory) leaks into them.

A model is named by its hub id when it has one, else by its name: an embedded model by its hub
id; a hub snapshot by its repo id; a GGUF conversion by the GGUF it came from; a step of a run
(or `final`, or a `compress --target` export) by the model its run started from, walking up
through the lineage; a directory whose config names a hub id (`_name_or_path`) by that id;
otherwise by the directory's name, never a generic one (`hf`, `final`, a step directory).
A hub id is taken only from where one is recorded (the embedded table, a config, the hub
cache), never from the shape of what the user typed: `runs/x` is a relative path as often as a
repo, so a string is a hub id only when it is no local path and the hub cache holds that repo;
otherwise only its last part is public.
A data file is named by its file name and sha256.

The run-directory files read here (step markers, `recipe.yaml`, `auto.json`) are named by
kompakt.rundir.layout and read as plain files, so this module stays below recipe/ and auto/.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from kompakt.model.embedded import DEFAULT_MODEL, EMBEDDED_MODELS
from kompakt.model.gguf_convert import SOURCE_RECORD as GGUF_SOURCE
from kompakt.model.loaded import LoadedModel
from kompakt.rundir.layout import AUTO_FILE
from kompakt.rundir.layout import MARKER as STEP_MARKER
from kompakt.rundir.layout import RECIPE_FILE as RUN_RECIPE

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Directory names that say nothing about the model (what a run or an export calls its outputs).
GENERIC = {"hf", "final", "model", "export", "out", "output", "steps", "attempts", "snapshots", "checkpoint"}
_STEP_DIR = re.compile(r"^\d+(-[\w.]+)?$")  # steps/03-quant.rtn, attempts/2
_MAX_DEPTH = 8  # a run started from another run's step, started from another...


def public_model_name(model: LoadedModel | str | Path | None) -> str:
    """The hub id or name a shared artifact names `model` by (never a local path)."""
    if isinstance(model, LoadedModel):
        embedded = EMBEDDED_MODELS.get(model.name.lower())
        if embedded is not None:
            return embedded.hub_id or embedded.name
        if model.path is None:
            return _last_part(model.name)
        return _from_path(Path(model.path), 0)
    return _from_source(model, 0)


def display_name(public: str) -> str:
    """A hub id's model part (`general.name` of a GGUF): "HuggingFaceTB/SmolLM2-135M" -> "SmolLM2-135M"."""
    return public.rsplit("/", 1)[-1]


def _is_hub_id(text: str) -> bool:
    """`owner/name` that is no local path (checked from here: the caller's directory)."""
    return bool(HUB_ID.match(text)) and not Path(text).expanduser().exists()


def _from_source(source: str | Path | None, depth: int) -> str:
    """A recipe's `model` value or a command-line source: None = the embedded default. A local
    path wins, as kompakt.model.load decides; then the embedded table; then the hub cache."""
    text = str(DEFAULT_MODEL if source is None else source)
    path = Path(text).expanduser()
    if path.exists():
        return _from_path(path, depth + 1) if depth < _MAX_DEPTH else _good_name(path.resolve())
    embedded = EMBEDDED_MODELS.get(text.lower())
    if embedded is not None:
        return embedded.hub_id or embedded.name
    if _is_hub_id(text) and _in_hub_cache(text):
        return text
    return _last_part(text)  # a path that is not here (or an uncached id): its last part is all that is public


def _in_hub_cache(repo_id: str) -> bool:
    """The hub cache holds this repo: it was downloaded as one (kompakt.model.load's hub source)."""
    from huggingface_hub import constants

    owner, name = repo_id.split("/", 1)
    return (Path(constants.HF_HUB_CACHE) / f"models--{owner}--{name}").is_dir()


def _from_path(path: Path, depth: int) -> str:
    path = path.resolve()
    if path.is_file():
        return _from_gguf_file(path) if path.suffix.lower() == ".gguf" else _good_name(path.parent)
    for found in (_from_gguf_record, _from_run, _from_hub_cache, _from_config):
        name = found(path, depth)
        if name:
            return name
    return _good_name(path)


def _from_gguf_file(path: Path) -> str:
    for spec in EMBEDDED_MODELS.values():
        if path.name == spec.gguf_name:
            return spec.hub_id or spec.name
    return path.stem


def _from_gguf_record(path: Path, depth: int) -> str | None:
    """A GGUF converted into the cache: named after the GGUF (the embedded ones by hub id)."""
    record = _read_json(path / GGUF_SOURCE)
    return _from_gguf_file(Path(str(record["source"]))) if record and record.get("source") else None


def _from_run(path: Path, depth: int) -> str | None:
    """A step directory (steps/NN-pass, what `final` points at) or a `compress --target` export
    (out/export/hf): the model its run started from, which may itself be a run's step."""
    owner = _read_json(path.parent.parent / AUTO_FILE) if path.parent.name == "export" else None
    if owner is not None:
        return _from_source(owner.get("model"), depth + 1)
    if (path / STEP_MARKER).is_file() and path.parent.name == "steps":
        recipe = _read_yaml(path.parent.parent / RUN_RECIPE)
        if isinstance(recipe, dict):
            return _from_source(recipe.get("model"), depth + 1)
    return None


def _from_hub_cache(path: Path, depth: int) -> str | None:
    """~/.cache/huggingface/hub/models--owner--name/snapshots/<sha>: owner/name."""
    for part in path.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    return None


def _from_config(path: Path, depth: int) -> str | None:
    config = _read_json(path / "config.json") or {}
    name = str(config.get("_name_or_path") or "")
    return name if _is_hub_id(name) else None


def _good_name(path: Path) -> str:
    """The nearest directory name (walking up at most two levels) that is not generic; never the
    home directory or above it (a user name is not a model name)."""
    home = Path.home().resolve()
    for candidate in (path, *path.parents)[:3]:
        if candidate == home or candidate in home.parents:
            break
        if candidate.name and candidate.name.lower() not in GENERIC and not _STEP_DIR.match(candidate.name):
            return candidate.name
    return "model"


def _last_part(text: str) -> str:
    name = Path(text).name or "model"
    return "model" if name.lower() in GENERIC else name


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


# --- data -------------------------------------------------------------------------------------


def public_data(path: str | Path) -> dict[str, str]:
    """A data file as {"file": name, "sha256": hex} (a directory: {"directory": name, "sha256": the
    hash of its SHA256SUMS-style listing}); only the name when the path is not there to hash."""
    source = Path(str(path)).expanduser()
    if source.is_file():
        return {"file": source.name, "sha256": _sha256(source)}
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file())
        listing = "".join(f"{_sha256(p)}  {p.relative_to(source).as_posix()}\n" for p in files)
        return {"directory": source.resolve().name, "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    return {"file": source.name}


def _sha256(path: Path) -> str:
    from kompakt.export.manifest import sha256_file

    return sha256_file(path)


# --- recipe -----------------------------------------------------------------------------------

_MODEL_KEYS = ("teacher",)  # step options that name a model; any other path is data


def public_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """A recipe's values (Recipe.to_dict / its YAML) with the model and every path made public."""
    public = dict(values)
    public["model"] = public_model_name(values.get("model"))
    data = dict(values.get("data") or {})
    for key in ("calibration", "evaluation"):
        if data.get(key) is not None:
            data[key] = public_data(data[key])
    public["data"] = data
    public["steps"] = [_public_value(step) for step in values.get("steps") or []]
    public["exports"] = [_public_value(item) for item in values.get("exports") or []]
    return public


def public_recipe_yaml(text: str) -> str:
    """`public_recipe` of a recipe.yaml's text, as YAML in recipe.yaml's own layout (block-style
    sections, one line per step), so the report's null annotations apply to it; the text
    unchanged when it is not a recipe."""
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if not isinstance(values, dict):
        return text
    public = public_recipe(values)
    if isinstance(public.get("metrics"), list):
        public["metrics"] = _FlowList(public["metrics"])
    public["steps"] = [{name: _flow(config) for name, config in step.items()} if isinstance(step, dict) else step
                       for step in public["steps"]]  # fmt: skip
    public["exports"] = [_flow(item) for item in public["exports"]]
    return yaml.dump(public, Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


class _FlowDict(dict):
    """Written on one line, as recipe.yaml writes a step's options and an export."""


class _FlowList(list):
    """Written on one line, as recipe.yaml writes its metrics."""


class _RecipeDumper(yaml.SafeDumper):
    pass


_RecipeDumper.add_representer(
    _FlowDict, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True))
_RecipeDumper.add_representer(
    _FlowList, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def _flow(value: Any) -> Any:
    return _FlowDict(value) if isinstance(value, dict) else value


def _public_value(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _public_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_public_value(v, key) for v in value]
    if isinstance(value, str) and key in _MODEL_KEYS:
        return public_model_name(value)  # a name, a hub id or a path: never shared as given
    if isinstance(value, str) and _looks_like_path(value):
        return public_data(value)
    return value


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~", "./", "../")) or ("/" in text and Path(text).expanduser().exists())


# --- free text --------------------------------------------------------------------------------

# A path part: no separator, whitespace, quote, bracket or list punctuation.
_PART = r"[^/\s'\"`(),;]+"
# /home/<user> and /Users/<user>: the user name may hold spaces, and is all that part says.
_HOME = re.compile(r"(?<![\w.])(?:/(?:home|Users)/[^/\n'\"`(),;:]*[^/\s'\"`(),;:]|/root(?=/|\s|$))")
_QUOTED_PATH = re.compile(r"""(['"`])~?/[^'"`\n]*\1""")
# An unquoted path: directories may hold single spaces (they end in "/"), the last part may not;
# not after a word, a dot, "~" or ":" (a relative path, a URL).
_ABSOLUTE_PATH = re.compile(rf"(?<![\w:/.~])~?/(?:{_PART}(?: {_PART})*/)*{_PART}")


def scrub_paths(text: str) -> str:
    """Every absolute (or ~) path in free text (a note, an error message) cut to its last part;
    a home directory (whose name is the user's) becomes `~` first. Conservative: where a path's
    end is ambiguous more of it goes, never less."""
    home = str(Path.home())
    if home not in ("", "/"):
        text = re.sub(re.escape(home) + r"(?![\w.-])", "~", text)  # not /root in /rooted
    text = _HOME.sub("~", text)
    text = _QUOTED_PATH.sub(lambda found: found.group(1) + _last_part_of(found.group(0)[1:-1]) + found.group(1), text)
    return _ABSOLUTE_PATH.sub(lambda found: _last_part_of(found.group(0)), text)


def _last_part_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] or "~"
