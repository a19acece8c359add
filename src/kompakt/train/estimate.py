"""How long a training step will take, before running it (for planners and the README).

Training FLOPs per token ≈ 6·N for the student (forward 2N, backward 4N) plus 2·N_teacher for
the teacher's forward (no backward), N = parameters taking part in the matmuls. Wall time =
tokens · that / the machine's achieved FLOP/s, which `achieved_flops` derives from one measured
run (tokens/s of a known student / teacher pair). LoRA still runs the full backward through
the activations (≈ 4N per token) but no weight gradients of the frozen matrices: ≈ 4N + 2N.
"""

from __future__ import annotations


def flops_per_token(student_params: int, teacher_params: int = 0, *, lora: bool = False) -> float:
    """Training FLOPs per token: student forward + backward (+ the teacher's forward)."""
    student = (4 if lora else 6) * student_params
    return float(student + 2 * teacher_params)


def achieved_flops(tokens_per_s: float, student_params: int, teacher_params: int = 0) -> float:
    """The FLOP/s a measured run achieved (use it to scale to other models on the same machine)."""
    return tokens_per_s * flops_per_token(student_params, teacher_params)


def estimate_seconds(tokens: int, student_params: int, teacher_params: int, flops_per_s: float,
                     *, lora: bool = False) -> float:  # fmt: skip
    """Wall time of a training step of `tokens` tokens on a machine achieving `flops_per_s`."""
    return tokens * flops_per_token(student_params, teacher_params, lora=lora) / flops_per_s
