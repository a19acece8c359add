"""ONNX export of a sentence-embedding encoder, pooling and normalisation inside the graph.

    written = write_onnx(loaded, directory, type="int8")   # directory/model.onnx + tokenizer + configs

The directory is the layout optimum writes (`optimum-cli export onnx`) and sentence-transformers'
ONNX backend reads (`SentenceTransformer(dir, backend="onnx")` finds `model.onnx` at the top):

    model.onnx                 inputs  input_ids, attention_mask [, token_type_ids]   int64 [batch, sequence]
                               outputs sentence_embedding [batch, dim]  (pooled, normalised as the model's
                                       sentence-transformers files say: the same vector kompakt's embed() gives)
                                       last_hidden_state [batch, sequence, dim]  (token embeddings, what
                                       optimum's feature-extraction model and sentence-transformers pool)
    config.json, tokenizer.json, tokenizer_config.json, ...   (the model's own tokenizer, max length set)
    modules.json, 1_Pooling/config.json, sentence_bert_config.json   (sentence-transformers' pooling)

So `onnxruntime` alone, with any tokenizer that gives the same ids, yields finished sentence
embeddings; nothing but the tokenizer runs outside the graph. token_type_ids is an input exactly
when the model's tokenizer produces it (BERT, MiniLM; not DistilBERT, RoBERTa, ModernBERT):
that is what a caller feeds, so the graph asks for nothing else.

int8 is onnxruntime's own dynamic quantization (`quantize_dynamic`): weights of every MatMul
stored as int8 per output channel, activations quantized per batch at run time, as ONNX users
expect. Per-channel because per-tensor scales cost accuracy on all-MiniLM-L6-v2 (mean cosine to
fp32 0.962 per tensor, 0.993 per channel over 256 WikiText sentences) at the same speed.

Exporter: torch.onnx's dynamo exporter (torch.export), opset 23, where scaled-dot-product
attention is one ONNX Attention node that onnxruntime (>= 1.23) runs as a fused kernel: on
all-MiniLM-L6-v2 at batch 32, 2 threads, opset 18's decomposed attention ran 0.74x torch in fp32
and its int8 graph quantized the Q.K and attention.V products too (0.70x the opset-23 int8
speed). The legacy TorchScript tracer
(dynamo=False) still exists in torch 2.13 but records one trace of transformers' attention-mask
code: on all-MiniLM-L6-v2 its graph differed from the model by 0.078 on a padded batch it had
not seen, while the dynamo graph agrees within 3e-7 with dynamic batch and sequence axes on
bert, distilbert, roberta, xlm-roberta and modernbert alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from kompakt.errors import ConfigError, KompaktError
from kompakt.model.loaded import LoadedModel
from kompakt.model.progress import spinner

ONNX_TYPES = ("f32", "int8")
MODEL_FILE = "model.onnx"
OPSET = 23  # attention as one Attention node (onnxruntime >= 1.23 runs it)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a tokenizer can give and a graph take
OUTPUTS = ("sentence_embedding", "last_hidden_state")
# what quantize_dynamic turns int8: its default list less "Attention", a name it takes for the
# com.microsoft fused op and rewrites into a QAttention node onnxruntime rejects on opset 23's own
QUANTIZED_OPS = ["MatMul", "Gather", "Conv", "LSTM", "Transpose", "EmbedLayerNormalization"]
PROTOBUF_LIMIT = 2_000_000_000  # bytes one .onnx file can hold; larger weights go to model.onnx.data


class OnnxExportError(KompaktError):
    """torch.onnx could not export the model (an architecture it cannot trace)."""


@dataclasses.dataclass
class OnnxExport:
    directory: Path
    type: str
    inputs: list[str]
    size_bytes: int  # model.onnx (and its external data, when any)
    notes: list[str] = dataclasses.field(default_factory=list)


class SentenceEmbedding(nn.Module):
    """The encoder plus the model's pooling: token ids in, (sentence embedding, token embeddings) out.

    The pooling is kompakt.model.sentence.pool, the very function embed() calls, so the graph
    cannot drift from what kompakt measures."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.encoder = loaded.model
        self.pooling = loaded.pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        from kompakt.model.sentence import pool

        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return pool(hidden, attention_mask, self.pooling), hidden


def require_onnx() -> None:
    """The exporter (onnx, onnxscript), the runtime and its quantizer (onnxruntime), or one line
    naming the extra that brings them; called before the model is loaded."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}: pip install 'kompakt[encoders]'")


def refuse_decoder(loaded: LoadedModel) -> None:
    """A causal LM has no sentence embedding to put in the graph: say which formats it has."""
    if not loaded.is_encoder:
        raise ConfigError(
            f"{loaded.name} is a causal language model; --format onnx exports sentence-embedding encoders "
            "(BERT, MiniLM, RoBERTa, ModernBERT): export it with --format gguf (llama.cpp) or --format hf"
        )


def graph_inputs(loaded: LoadedModel) -> list[str]:
    """What kompakt.model.encode.tokenize feeds the encoder (the tokenizer's outputs the forward
    takes), in the order of SentenceEmbedding.forward's arguments."""
    from kompakt.model.encode import tokenize

    fed = set(tokenize(loaded, ["x"]))
    return [name for name in INPUTS if name in fed or name in ("input_ids", "attention_mask")]


def write_onnx(loaded: LoadedModel, directory: str | Path, *, type: str = "f32") -> OnnxExport:
    """Write the ONNX model, tokenizer and configs into `directory` (which the caller stages:
    kompakt.export.api puts it in place only after the check passed).

    Raises:
        ConfigError: a causal LM, or a type other than f32 / int8.
        OnnxExportError: torch.onnx failed on this architecture (one line, nothing written kept).
    """
    if type not in ONNX_TYPES:
        raise ConfigError(f"--format onnx takes --type {', '.join(ONNX_TYPES)}; got {type!r}")
    refuse_decoder(loaded)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = graph_inputs(loaded)
    fp32 = directory / MODEL_FILE if type == "f32" else directory / "model-f32.onnx"
    external = _weight_bytes(loaded) > PROTOBUF_LIMIT * 0.9
    with spinner(f"exporting {loaded.name} to ONNX (torch.onnx)"):
        export_graph(loaded, fp32, names, external=external)
    if type == "int8":
        with spinner("quantizing to int8 (onnxruntime quantize_dynamic)"):
            quantize_int8(fp32, directory / MODEL_FILE, external=external)
        for path in (fp32, fp32.with_name(fp32.name + ".data")):
            path.unlink(missing_ok=True)
    _write_companions(loaded, directory)
    return OnnxExport(directory, type, names, onnx_bytes(directory))


def onnx_bytes(directory: Path) -> int:
    """Bytes of an export directory's graph: model.onnx and its external data, when any."""
    return sum(path.stat().st_size for path in Path(directory).glob(MODEL_FILE + "*"))


def export_graph(loaded: LoadedModel, path: Path, names: list[str], *, external: bool = False) -> None:
    """torch.onnx.export (dynamo) of SentenceEmbedding with dynamic batch and sequence axes, in fp32,
    without the exporter's per-node metadata.

    The example batch is 2 x 8 with one padded row: torch.export specialises a dimension whose
    example size is 0 or 1, and padding exercises the mask path."""
    module = SentenceEmbedding(as_fp32_cpu(loaded)).eval()
    args = _example_inputs(loaded, names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                module, args, None, dynamo=True, opset_version=OPSET, input_names=names, output_names=list(OUTPUTS),
                dynamic_shapes={name: {0: batch, 1: sequence} for name in names}, verbose=False, optimize=False,
            )  # fmt: skip
            _fold(program)
    except Exception as error:  # noqa: BLE001 - any exporter failure is this architecture's, said in one line
        family = getattr(loaded.model.config, "model_type", type(loaded.model).__name__)
        raise OnnxExportError(
            f"torch.onnx cannot export {loaded.name} ({family}): {_first_line(error)}; "
            "export it with --format hf (or gguf) instead"
        ) from None
    _strip_node_metadata(program.model)
    program.save(str(path), external_data=external)  # external: weights in model.onnx.data beside it


def _fold(program) -> None:
    """What torch.onnx's optimize=True does (onnxscript's constant folding and dead-code removal)
    less its opset-23 fusions: those turn ModernBERT's rotary code into a RotaryEmbedding node that
    onnxruntime 1.32 rejects for a batch of more than one, and BERT-class encoders have nothing
    else they fuse (no RMSNorm, no grouped-query attention)."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(program.model)


def _strip_node_metadata(model) -> None:
    """Drop what the exporter records per node (Python stack traces with this machine's paths,
    FX node text, module names): the export ships, and these hold local paths (DESIGN.md: shared
    artifacts name no local path) and a third of a small model's file. `model` is the exporter's
    onnx_ir model, edited before it is serialised (no 2 GB protobuf in memory)."""
    for graph in [model.graph, *model.functions.values()]:
        for node in graph.all_nodes():  # subgraphs included
            node.metadata_props.clear()


def quantize_int8(source: Path, target: Path, *, external: bool = False) -> None:
    """onnxruntime's dynamic int8 quantization: int8 weights per output channel, uint8 activations
    quantized at run time (the ONNX Runtime default for transformers on CPU)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=QUANTIZED_OPS, use_external_data_format=external)  # fmt: skip


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporters' chatter off the user's terminal: torch.export's UserWarnings about
    transformers internals, torch.onnx's "torchvision is not installed" lines and the quantizer's
    advice to pre-process (logged on the root logger). Errors still raise."""
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in quiet]
    advice = _DropMessage("Please consider to run pre-processing")
    logging.getLogger().addFilter(advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in quiet:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        logging.getLogger().removeFilter(advice)
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def as_fp32_cpu(loaded: LoadedModel) -> LoadedModel:
    """The model in float32 on the CPU (a copy only when it is not already): what the graph holds,
    and what the check compares it with (a bf16 or GPU original would differ by more than the
    export does)."""
    if loaded.compute_dtype == torch.float32 and loaded.device.type == "cpu":
        return loaded
    import copy

    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to("cpu", torch.float32), _fingerprint=None)


def _example_inputs(loaded: LoadedModel, names: list[str]) -> tuple[torch.Tensor, ...]:
    """Real token ids of two sentences, padded to 8 positions (the second one padded)."""
    tokenizer = loaded.tokenizer
    encoded = tokenizer(["an example sentence with several words in it", "short"], padding="max_length",
                        truncation=True, max_length=8, return_tensors="pt")  # fmt: skip
    if int(encoded["attention_mask"][1].sum()) == 8:  # a tokenizer without a pad token: pad by hand
        encoded["attention_mask"][1, 4:] = 0
    return tuple(encoded[name] if name in encoded else torch.zeros_like(encoded["input_ids"]) for name in names)


def _write_companions(loaded: LoadedModel, directory: Path) -> None:
    """config.json, the tokenizer (its max length the one the model was exported for) and the
    sentence-transformers files, so optimum and sentence-transformers' ONNX backend read the directory."""
    from kompakt.model.encode import input_limit
    from kompakt.model.sentence import write_sentence_files

    loaded.model.config.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    # `tokenizer(text, truncation=True)` then cuts where kompakt does (kompakt.model.encode)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["model_max_length"] = input_limit(loaded)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_sentence_files(directory, loaded.pooling, int(loaded.model.config.hidden_size))


def _weight_bytes(loaded: LoadedModel) -> int:
    return loaded.num_parameters() * 4


def _first_line(error: BaseException) -> str:
    """The exporter's message without its multi-paragraph advice: the exception it wraps, when any."""
    cause = error.__cause__ or error
    text = f"{type(cause).__name__}: {cause}"
    return " ".join(text.strip().splitlines()[0].split())[:300]
