"""Aggregate bench records (one dict per question x turn x method x repeat) into the summary.

Spec-Bench's convention: a question's speed is its new tokens over its wall time, both summed over
its turns; a method's tokens/s is the mean of its questions' speeds (each repeat counts as one
question); speedup = that mean ÷ autoregressive's mean over the same questions, in the same run.
  tau   = total committed tokens / total target forwards (steps), over all records
  alpha = total accepted / total drafted
  acceptance_at[i] = accepted at draft position i / drafted at position i (summed counts)
  c     = drafter time per drafted token / target time per step (the cost ratio of DESIGN.md)
Peers (transformers' generate) report no counts: their tau, alpha and acceptance are None.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from outrider.stats import SpecStats

BASELINE = "autoregressive"
Record = dict[str, Any]


def record_key(r: Record) -> tuple[str, int, str, int]:
    return (str(r["question_id"]), int(r["turn"]), str(r["method"]), int(r["repeat"]))


def _units(records: Iterable[Record]) -> dict[tuple[str, int], tuple[int, float, frozenset[int]]]:
    """(question_id, repeat) -> (new tokens, wall seconds, turns) summed over its turns."""
    acc: dict[tuple[str, int], list] = {}
    for r in records:
        u = acc.setdefault((str(r["question_id"]), int(r["repeat"])), [0, 0.0, set()])
        u[0] += r["new_tokens"]
        u[1] += r["wall_s"]
        u[2].add(int(r["turn"]))
    return {k: (v[0], v[1], frozenset(v[2])) for k, v in acc.items()}


def mean_speed(units: dict, keys: Iterable[tuple[str, int]]) -> float | None:
    speeds = [units[k][0] / units[k][1] for k in keys if units[k][1] > 0]
    return sum(speeds) / len(speeds) if speeds else None


def _stats_of(r: Record) -> SpecStats:
    """The counts and times of one outrider record (peers have none)."""
    return SpecStats(
        steps=r["steps"], new_tokens=r["new_tokens"], drafted=r["drafted"], accepted=r["accepted"],
        drafted_at=list(r["drafted_at"]), accepted_at=list(r["accepted_at"]),
        draft_s=r.get("draft_s") or 0.0, target_s=r.get("target_s") or 0.0,
    )


def group_stats(records: Sequence[Record], baseline: Sequence[Record]) -> dict[str, Any]:
    """Figures of one method (optionally one category): records, and the baseline's records."""
    units = _units(records)
    base = _units(baseline)
    # Only questions both ran with the same turns are compared (a run stopped midway leaves others).
    common = [k for k in units if k in base and base[k][2] == units[k][2]]
    speed, base_speed = mean_speed(units, common), mean_speed(base, common)
    counted = [r for r in records if r.get("steps") is not None]
    total = SpecStats()
    for r in counted:
        total = total.merge(_stats_of(r))
    steps, drafted = total.steps, total.drafted
    c = (total.draft_s / drafted) / (total.target_s / steps) if drafted and steps and total.target_s > 0 else None
    matches = [r["matches_autoregressive"] for r in records if r.get("matches_autoregressive") is not None]
    return {
        "records": len(records),
        "questions": len(units),
        "compared": len(common),
        "new_tokens": sum(r["new_tokens"] for r in records),
        "wall_s": sum(r["wall_s"] for r in records),
        "tokens_per_s": speed,
        "baseline_tokens_per_s": base_speed,
        "speedup": speed / base_speed if speed is not None and base_speed else None,
        "tau": total.tau if steps else None,
        "alpha": total.alpha if drafted else None,
        "acceptance_at": total.acceptance_at if counted else None,  # every merged position was drafted
        "c": c,
        "match_rate": sum(matches) / len(matches) if matches else None,
    }


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """(1 - α^(k+1)) / ((1 - α)(k·c + 1)): expected tokens per step over the step's cost in target
    steps, verification counted as one decode step (memory-bound)."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + 1)


def predicted_speedup(records: Sequence[Record]) -> float | None:
    """The cost model's prediction from measured counts: tau / (d·c + v(n + 1)), with n the mean
    draft size (tree nodes) per step, d the mean draft-model forwards per step (a tree's growth may
    go deeper than the nodes it keeps) and c, v(n) the costs the method calibrated (costs.py).
    None without counts or costs."""
    from outrider.costs import CostModel

    counted = [r for r in records if r.get("steps") and r.get("costs")]
    if not counted:
        return None
    costs = CostModel.from_dict(counted[0]["costs"])
    steps = sum(r["steps"] for r in counted)
    size = sum(r["drafted"] for r in counted) / steps
    depth = sum(r.get("draft_forwards") or 0 for r in counted) / steps
    tau = sum(r["new_tokens"] for r in counted) / steps
    return tau / (depth * costs.c + costs.v(round(size) + 1))


def sweep_summary(records: Sequence[Record], summary: dict[str, Any]) -> dict[str, Any]:
    """For methods run at several k ("name@k=K", trees "name@w=W@k=K"): measured speedup per k, the
    chain formula's curve from α and c measured over all of that method's fixed k (pooled counts
    and times), and the cost model's prediction from each variant's measured tau and draft size."""
    from outrider.bench.peers import split_options

    out: dict[str, Any] = {}
    for m in summary["methods"]:
        base, options = split_options(m)
        if "k" not in options:
            continue
        group = base + (f"@w={options['w']}" if options.get("w", 1) != 1 else "")
        entry = out.setdefault(group, {"k": [], "speedup": [], "alpha": [], "tau": [], "c": [], "size": [],
                                       "predicted": [], "_names": []})
        o = summary["overall"][m]
        for key in ("speedup", "alpha", "tau", "c"):
            entry[key].append(o[key])
        mine = [r for r in records if r["method"] == m and r.get("steps")]
        steps = sum(r["steps"] for r in mine)
        entry["size"].append(sum(r["drafted"] for r in mine) / steps if steps else None)
        entry["predicted"].append(predicted_speedup(mine))
        entry["k"].append(options["k"])
        entry["_names"].append(m)
    for group, entry in out.items():
        names = entry.pop("_names")
        fixed = [n for n, k in zip(names, entry["k"]) if isinstance(k, int)]  # "auto" varies k per step
        pooled = group_stats([r for r in records if r["method"] in fixed], [])
        entry["pooled_alpha"], entry["pooled_c"] = pooled["alpha"], pooled["c"]
        chain = "@w=" not in group
        ok = chain and pooled["alpha"] is not None and pooled["c"] is not None
        entry["theoretical"] = [expected_speedup(pooled["alpha"], k, pooled["c"]) if ok and isinstance(k, int)
                                else None for k in entry["k"]]
    return out


def summarize(records: Sequence[Record], methods: Sequence[str] | None = None) -> dict[str, Any]:
    """{"methods", "categories", "overall": {m: stats}, "by_category": {m: {cat: stats}}, "sweep"}."""
    if methods is None:
        methods = sorted({r["method"] for r in records}, key=lambda m: (m != BASELINE, m))
    categories = sorted({r["category"] for r in records})
    by_method = {m: [r for r in records if r["method"] == m] for m in methods}
    baseline = by_method.get(BASELINE) or [r for r in records if r["method"] == BASELINE]
    overall = {m: group_stats(by_method[m], baseline) for m in methods}
    by_category = {
        m: {c: group_stats([r for r in by_method[m] if r["category"] == c],
                           [r for r in baseline if r["category"] == c]) for c in categories}
        for m in methods
    }
    out = {"methods": list(methods), "categories": categories, "overall": overall, "by_category": by_category}
    out["sweep"] = sweep_summary(records, out)
    return out
