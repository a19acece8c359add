"""`kompakt export` and GGUF files in `kompakt eval`: one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest





def test_export_gguf_default_name_and_manifest(tiny_dir, cli):
    code, out, _ = cli(["export", str(tiny_dir), "--type", "q8_0"])
    assert code == 0
    target = tiny_dir.parent / "tiny-q8_0.gguf"
    assert target.read_bytes()[:4] == b"GGUF"
    assert (tiny_dir.parent / "tiny-q8_0.gguf.sha256").is_file()
    assert "wrote" in out and "sha256 manifest" in out


def test_export_existing_file_without_force_is_one_line(tiny_dir, cli):
    target = tiny_dir.parent / "x.gguf"
    target.write_bytes(b"old")
    code, _, err = cli(["export", str(tiny_dir), "--out", str(target)])
    assert code == 2 and "exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert target.read_bytes() == b"old"
    code, _, _ = cli(["export", str(tiny_dir), "--out", str(target), "--force"])
    assert code == 0 and target.read_bytes()[:4] == b"GGUF"


def test_export_hf_directory(tiny_dir, cli):
    code, _, _ = cli(["export", str(tiny_dir), "--format", "hf", "--type", "f16", "--out", "hf"])
    assert code == 0
    from kompakt.export import verify_manifest

    assert verify_manifest(tiny_dir.parent / "hf") == []
    assert _float_dtypes(tiny_dir.parent / "hf") == {"F16"}  # what --type asked for, every tensor
    assert json.loads((tiny_dir.parent / "hf" / "config.json").read_text())["dtype"] == "float16"


def _float_dtypes(directory) -> set[str]:
    """The safetensors dtypes of every tensor stored in a directory."""
    from safetensors import safe_open

    found = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            found |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return found


def test_bad_type_is_one_line(tiny_dir, cli):
    code, _, err = cli(["export", str(tiny_dir), "--type", "q7_0"])
    assert code == 2 and "takes --type" in err


def test_tensor_type_writes_mixed_types_and_says_so(tiny_dir, cli):
    import gguf

    target = tiny_dir.parent / "mixed.gguf"
    argv = ["export", str(tiny_dir), "--type", "q4_0", "--tensor-type", "ffn_down=q8_0", "--tensor-type",
            r"blk\.0\.attn_v=q5_0", "--out", str(target), "--no-verify"]  # fmt: skip
    code, out, err = cli(argv)
    assert code == 0, err
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(target)).tensors}
    assert types["blk.2.ffn_down.weight"] == "q8_0" and types["blk.0.attn_v.weight"] == "q5_0"
    assert types["blk.1.attn_v.weight"] == "q4_0"
    assert "tensor types: q4_0:" in out and "blk.0-3.ffn_down" in out


@pytest.mark.parametrize(
    "override, message",
    [("ffn_down", "write PATTERN=TYPE"), ("ffn_down=q7_0", "unknown GGUF type 'q7_0'"),
     ("ffn_dwn=q8_0", "matches no weight tensor"), ("ffn_down=q4_k", "rows of 128, not a multiple of 256"),
     ("(=q8_0", "no regular expression")],
)  # fmt: skip
def test_bad_tensor_type_is_one_line_and_writes_nothing(override, message, tiny_dir, cli):
    target = tiny_dir.parent / "bad.gguf"
    code, _, err = cli(["export", str(tiny_dir), "--type", "q4_0", "--tensor-type", override, "--out", str(target)])  # fmt: skip
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(p.name.startswith("bad.gguf") for p in tiny_dir.parent.iterdir())


def test_corrupt_gguf_in_eval_is_one_line(tiny_dir, cli):
    code, _, _ = cli(["export", str(tiny_dir), "--type", "f16", "--out", "good.gguf"])
    data = (tiny_dir.parent / "good.gguf").read_bytes()
    bad = tiny_dir.parent / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = cli(["eval", str(bad)])
    assert code == 2 and "truncated or corrupt" in err and len(err.strip().splitlines()) == 1


def test_a_check_that_cannot_run_is_not_called_passed(tiny_dir, cli, monkeypatch):
    """Without llama-cpp-python the GGUF is not checked: said so, and verify.json says passed: null."""
    import json

    import kompakt.export.check as check_module

    monkeypatch.setattr(check_module, "llamacpp_installed", lambda: False)
    code, out, _ = cli(["export", str(tiny_dir), "--type", "q8_0", "--out", "s.gguf"])
    out = " ".join(out.split())
    assert code == 0 and "check: not checked: llama-cpp-python is not installed" in out and "passed" not in out
    saved = json.loads((tiny_dir.parent / "s.gguf.verify.json").read_text())
    assert saved["passed"] is None and "llama-cpp-python is not installed" in saved["skipped"]
