import json

import pytest

from sdt.common.errors import UserError
from sdt.search.agreement import agreement, main, skip_shares, spearman


def cola_result(paths: list[list[int] | None], depth: int = 6) -> dict:
    items = [{"best_correct": None if p is None else {"path": p, "length": len(p)}} for p in paths]
    return {"depth": depth, "items": items}


def routed_eval(fractions: dict[int, float], arch: str = "stt") -> dict:
    # STT-like table: routed layer i routes block i; SDT pairs would list [decision, dynamic].
    return {"arch": arch, "checkpoint": "x.ckpt", "routing": [
        {"layer": b, "blocks": [b - 1, b] if arch == "sdt" else [b], "executed_fraction": f} for b, f in fractions.items()
    ]}  # fmt: skip


def test_skip_shares_and_spearman():
    cola = cola_result([[0, 1, 2, 4, 5], [0, 2, 4, 5], None, [0, 1, 2, 3, 4, 5, 5]])
    assert skip_shares(cola) == [0, 1 / 3, 0, 2 / 3, 0, 0]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(UserError, match="no correct path"):
        skip_shares(cola_result([None]))


def test_agreement_matches_skips_to_least_executed_blocks(tmp_path, capsys):
    cola = cola_result([[0, 1, 2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5]])  # block 1 skipped 2/3, block 3 always
    agree = agreement(cola, routed_eval({1: 0.4, 3: 0.2, 5: 0.9}), k=1)
    assert agree["routed_blocks"] == [1, 3, 5] and agree["skip_share"] == [2 / 3, 1.0, 0.0]
    assert agree["spearman"] == pytest.approx(1.0) and agree["most_skipped"] == agree["least_executed"] == [3]
    assert agree["top_k_overlap"] == 1 and agree["top_k_overlap_by_chance"] == pytest.approx(1 / 3)
    disagree = agreement(cola, routed_eval({1: 0.9, 3: 0.95, 5: 0.1}), k=1)
    assert disagree["spearman"] == pytest.approx(-1.0) and disagree["top_k_overlap"] == 0
    # An SDT pair's routed block is its dynamic (second) block.
    assert agreement(cola, routed_eval({1: 0.4, 3: 0.2, 5: 0.9}, arch="sdt"), k=1)["routed_blocks"] == [1, 3, 5]

    (tmp_path / "cola.json").write_text(json.dumps(cola))
    (tmp_path / "eval.json").write_text(json.dumps(routed_eval({1: 0.4, 3: 0.2, 5: 0.9})))
    out = main(
        [str(tmp_path / "cola.json"), str(tmp_path / "eval.json"), "--k", "1", "--out", str(tmp_path / "a.json")]
    )
    assert out == json.loads((tmp_path / "a.json").read_text()) and "Spearman +1.000" in capsys.readouterr().out
    (tmp_path / "eval.json").write_text(json.dumps({"checkpoint": "dense.ckpt"}))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "cola.json"), str(tmp_path / "eval.json")])
    assert e.value.code == 2 and "not a routed model" in capsys.readouterr().err
