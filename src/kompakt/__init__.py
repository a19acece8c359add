"""kompakt: turn a language model into a small language model.

The curated public API (imported lazily so `import kompakt` stays cheap):

    loaded = kompakt.load()                      # embedded SmolLM2-135M-Instruct
    ids = kompakt.load_tokens("notes.txt", loaded)
    result = kompakt.evaluate(loaded, reference=None, ids=ids)
    analysis = kompakt.analyze(loaded, ids, out="report/")
    run = kompakt.compress_auto("smollm2-135m", target="size=4x", out="runs/auto")
    run = kompakt.run_recipe(kompakt.Recipe.from_file("recipes/depth-25.yaml"), "runs/depth")
    kompakt.export(run.final, format="gguf", type="q4_0", out="small.gguf")
"""

from __future__ import annotations

from kompakt.lazy_api import lazy_getattr

__version__ = "0.1.0"

_API = {
    "load": "kompakt.model.load",
    "LoadedModel": "kompakt.model.loaded",
    "load_tokens": "kompakt.data",
    "read_texts": "kompakt.data",
    "evaluate": "kompakt.evaluate",
    "analyze": "kompakt.analyze",
    "stream_generate": "kompakt.serve.generate",
    "KompaktError": "kompakt.errors",
    "compress_auto": "kompakt.auto.api",
    "run_recipe": "kompakt.recipe.runner",
    "Recipe": "kompakt.recipe.schema",
    "export": "kompakt.export.api",
    "build_report": "kompakt.report.build",
}
__all__ = sorted(_API)

__getattr__ = lazy_getattr(__name__, _API)
