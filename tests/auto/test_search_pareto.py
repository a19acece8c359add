"""The Pareto set of searched candidates and the winner's reasons (kompakt.auto.search.pareto)."""

from __future__ import annotations

from kompakt.auto.search.pareto import pareto_set, quality, why_winner


def _row(index, params, proxy, final=None, tps=None, kind="depth"):
    return {"index": index, "kind": kind, "params": params, "proxy": {"kl_mean": proxy},
            "final": {"kl_mean": final} if final is not None else None,
            "latency": {"generate_tps": tps} if tps else None}  # fmt: skip


def test_pareto_uses_params_speed_and_best_kl():
    rows = [_row(1, 100, 0.9, 0.5, tps=50), _row(2, 100, 1.0, 0.6, tps=80, kind="mlp"),
            _row(3, 100, 1.2, None, tps=40, kind="mlp+hidden"), _row(4, 99, 2.0, None, tps=30)]  # fmt: skip
    assert quality(rows[0]) == 0.5 and quality(rows[2]) == 1.2  # healed KL first, else the proxy's
    # 3 is slower and worse than 1 at the same size; 4 is the smallest; 2 the fastest
    assert pareto_set(rows) == [1, 2, 4]
    without_speed = [{**r, "latency": None} for r in rows]
    assert pareto_set(without_speed) == [1, 4]  # params vs KL only
    why = why_winner(rows, 1, pareto_set(rows))
    assert why.startswith("candidate 1 (depth) has the lowest KL after healing: 0.5000 vs 0.6000 for candidate 2")
    assert "fastest candidate 80" in why and why.endswith("on the Pareto front")


def test_unhealed_winner_says_so():
    rows = [_row(1, 100, 0.9), _row(2, 100, 1.1)]
    assert "no budget left to heal" in why_winner(rows, 1, pareto_set(rows))


def test_heal_tokens_follow_the_budget():
    """Finalists heal with the user's tokens, else what the budget left affords, else nothing."""
    from kompakt.auto.facts import model_facts
    from kompakt.auto.search.run import SearchSettings, _heal_tokens
    from kompakt.model.tiny import tiny_model
    from kompakt.recipe.schema import DataSpec

    facts = model_facts(tiny_model("llama"), forward_tps=1000.0)  # stated throughput: nothing timed
    spec = DataSpec(eval_tokens=512, window=256, stride=256, block_len=256)
    settings = SearchSettings(keep=0.5, budget_s=600.0, finalists=2, proxy_tokens=1024)
    assert _heal_tokens(settings, 5.0, facts, spec) == 0  # not even one heal step fits
    afforded = _heal_tokens(settings, 3600.0, facts, spec)
    assert afforded >= 4096 and afforded % 1024 == 0
    assert afforded > _heal_tokens(settings, 1800.0, facts, spec)  # more time, more tokens
    assert _heal_tokens(SearchSettings(keep=0.5, budget_s=None, heal_tokens=2048), 1.0, facts, spec) == 2048
