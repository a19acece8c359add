"""Off a terminal, saving and loading print no third-party progress bars: transformers' "Writing
model shards" and compressed-tensors' "Applying quantization config" / "Compressing model" used
to reach logs and `make demo` as carriage-return lines."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("compressed_tensors")

SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from kompakt.model.load import load
    from kompakt.model.save import save_model
    from kompakt.model.tiny import tiny_model
    from kompakt.passes.base import PassContext, build_config, get_pass
    from kompakt.rundir.stepsave import save_step_model

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    loaded = tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    save_model(loaded, out / "plain")
    load(out / "plain")
    spec = get_pass("quant.gptq")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    ctx = PassContext(loaded=loaded, original=lambda: loaded, calibration=lambda: calib, seed=0)
    report = spec.apply(ctx, build_config(spec, {"bits": 4, "group_size": 32}))
    details = save_step_model(report.loaded, out / "packed", torch.float32, report.packed_layers)
    assert details["stored_as"] == "compressed-tensors", details
    load(out / "packed")
    print("done")
""")


def test_save_and_packed_save_print_no_carriage_returns_off_a_terminal(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env, timeout=600, check=False)  # fmt: skip
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0 and b"done" in done.stdout, stderr[-2000:]
    assert "\r" not in stderr, stderr[:2000]
    for bar in ("Writing model shards", "Applying quantization config", "Compressing model"):
        assert bar not in stderr
