"""Do the layers CoLa search skips match the layers learned routers execute least?

`python -m sdt.search.agreement <cola.json> <eval.json> [<eval.json> ...]` compares the search on a dense model
(how often each layer is missing from the items' best correct paths) with routed models of the same backbone (each
routed block's executed fraction in `eval.json`'s `routing` table). An SDT pair's routed block is its dynamic block
(the decision block always runs); an STT or MoD layer routes its own block. Reported per routed model: the Spearman
rank correlation between skip share and (1 - executed fraction) over the routed blocks, and the overlap of the k
most-skipped blocks with the k least-executed ones beside the overlap two random choices would have (k*k/n).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from sdt.common.errors import EXIT_USER_ERROR, UserError


def skip_shares(cola: dict[str, Any]) -> list[float]:
    """Per layer of the searched model: the share of items with a correct path whose shortest one omits it."""
    paths = [it["best_correct"]["path"] for it in cola["items"] if it["best_correct"]]
    if not paths:
        raise UserError("cola.json has no correct path: nothing to compare")
    return [sum(i not in p for p in paths) / len(paths) for i in range(cola["depth"])]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return None  # a constant series has no ranking
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(cola: dict[str, Any], routed_eval: dict[str, Any], k: int | None = None) -> dict[str, Any]:
    table = routed_eval.get("routing")
    if not table:
        raise UserError(f"{routed_eval.get('checkpoint')}: eval.json has no routing table (not a routed model)")
    shares = skip_shares(cola)
    blocks = [e["blocks"][-1] for e in table]
    if max(blocks) >= len(shares):
        raise UserError(f"the routed model has {max(blocks) + 1}+ blocks but the search ran {len(shares)} layers")
    skipped = [shares[b] for b in blocks]
    unexecuted = [1.0 - e["executed_fraction"] for e in table]
    k = k or max(1, len(blocks) // 3)
    most_skipped = {blocks[i] for i in np.argsort(skipped, kind="stable")[::-1][:k]}
    least_executed = {blocks[i] for i in np.argsort(unexecuted, kind="stable")[::-1][:k]}
    return {
        "routed_checkpoint": routed_eval.get("checkpoint"),
        "arch": routed_eval.get("arch"),
        "routed_blocks": blocks,
        "skip_share": skipped,
        "executed_fraction": [e["executed_fraction"] for e in table],
        "spearman": spearman(skipped, unexecuted),
        "k": k,
        "most_skipped": sorted(most_skipped),
        "least_executed": sorted(least_executed),
        "top_k_overlap": len(most_skipped & least_executed),
        "top_k_overlap_by_chance": k * k / len(blocks),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cola_json")
    parser.add_argument("eval_json", nargs="+")
    parser.add_argument("--k", type=int, default=None, help="top-k size (default: a third of the routed blocks)")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    with open(args.cola_json) as f:
        cola = json.load(f)
    results = []
    for path in args.eval_json:
        with open(path) as f:
            try:
                results.append(agreement(cola, json.load(f), args.k))
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(EXIT_USER_ERROR)
        r = results[-1]
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:+.3f}"
        print(
            f"{r['arch']} ({path}): Spearman {rho} over {len(r['routed_blocks'])} routed blocks; top-{r['k']} overlap "
            f"{r['top_k_overlap']} (chance {r['top_k_overlap_by_chance']:.2f}); most skipped {r['most_skipped']}, "
            f"least executed {r['least_executed']}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
