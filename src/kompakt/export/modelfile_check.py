"""Parse an Ollama Modelfile the way `ollama create` reads it and list what is wrong with it.

Checked: every line is a known instruction; exactly one FROM, naming the exported GGUF (relative
to the Modelfile); TEMPLATE / SYSTEM blocks closed; the Go template's actions balanced ({{ }}
pairs, one `end` per range / if / with / block / define); PARAMETER names known and values of
the right kind (stop a quoted string, the rest numbers).
"""

from __future__ import annotations

import re
from pathlib import Path

INSTRUCTIONS = {"FROM", "TEMPLATE", "SYSTEM", "PARAMETER", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
# Ollama's documented parameters; all but stop take a number.
PARAMETERS = {"stop", "temperature", "num_ctx", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
              "seed", "num_predict", "mirostat", "mirostat_eta", "mirostat_tau", "tfs_z", "num_gpu", "num_thread",
              "typical_p", "presence_penalty", "frequency_penalty", "num_batch", "num_keep"}  # fmt: skip
_BLOCK = re.compile(r'^(\w+)\s+"""(.*?)"""\s*$', re.S)
_OPEN = re.compile(r"\{\{-?\s*(range|if|with|block|define)\b")
_END = re.compile(r"\{\{-?\s*end\s*-?\}\}")
_QUOTED = re.compile(r'^"(?:[^"\\]|\\.)*"$')


def _statements(text: str) -> list[str]:
    """One string per instruction (a triple-quoted block spans lines)."""
    statements, current = [], None
    for line in text.splitlines():
        if current is not None:
            current += "\n" + line
            if line.rstrip().endswith('"""'):
                statements.append(current)
                current = None
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if '"""' in line and line.count('"""') == 1:
            current = line
        else:
            statements.append(line)
    if current is not None:
        statements.append(current + "\n<unclosed>")
    return statements


def check_template(template: str) -> list[str]:
    problems = []
    if template.count("{{") != template.count("}}"):
        problems.append("TEMPLATE has unbalanced {{ }}")
    opened, closed = len(_OPEN.findall(template)), len(_END.findall(template))
    if opened != closed:
        problems.append(f"TEMPLATE opens {opened} range/if/with blocks but ends {closed}")
    return problems


def _check_parameter(value: str) -> list[str]:
    name, _, argument = value.strip().partition(" ")
    argument = argument.strip()
    if name not in PARAMETERS:
        return [f"unknown PARAMETER {name!r}"]
    if name == "stop":
        return [] if _QUOTED.match(argument) or (argument and " " not in argument) else [f"bad stop {argument!r}"]
    try:
        float(argument)
    except ValueError:
        return [f"PARAMETER {name} needs a number, got {argument!r}"]
    return []


def check_modelfile(modelfile: Path, gguf: Path) -> list[str]:
    """What is wrong with `modelfile` for an export whose GGUF is `gguf` ([] = valid)."""
    if not modelfile.is_file():
        return [f"no Modelfile at {modelfile.name}"]
    problems, froms = [], []
    for statement in _statements(modelfile.read_text(encoding="utf-8")):
        keyword, _, rest = statement.strip().partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            problems.append(f"unknown Modelfile instruction {keyword!r}")
        elif statement.endswith("<unclosed>"):
            problems.append(f'{keyword} block is not closed with """')
        elif keyword.upper() == "FROM":
            froms.append(rest.strip())
        elif keyword.upper() == "PARAMETER":
            problems += _check_parameter(rest)
        elif keyword.upper() == "TEMPLATE":
            block = _BLOCK.match(statement.strip())
            problems += check_template(block.group(2) if block else rest.strip().strip('"'))
    if len(froms) != 1:
        problems.append(f"the Modelfile has {len(froms)} FROM lines; it needs one")
    elif (modelfile.parent / froms[0]).resolve() != gguf.resolve():
        problems.append(f"FROM {froms[0]} does not point at {gguf.name}")
    elif not gguf.is_file():
        problems.append(f"FROM {froms[0]}: no such file")
    return problems
