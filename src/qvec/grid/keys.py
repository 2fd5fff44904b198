"""The protocol rules that the plan, the workers and the reports share: the content key of every result row, the
lambdas a pair is measured at, and which rule chose what.

A row's key hashes everything that determines its number (the states it evaluates, the quantizer record, the
target filter, the split and its limit, the vector, lambda), so a row measured once is never measured again, in
this study or another, and a changed input is never silently reused. The RTN records are the grid itself, as they
were before the quantizer registry, so older databases keep their keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from qvec.grid.artifacts import content_key
from qvec.vectors.rules import LambdaRule, choices, get_rule, lam_key, rule_list
from qvec.vectors.signals import measures_of

FLOAT_BASELINES = ("ft", "pretrained")
PTQ_BASELINES = ("ft_ptq", "qat_ptq", "pretrained_ptq")

Lookup = Callable[[Iterable[str]], Mapping[str, float]]


def result_key(kind: str, *, state: str, head: str, quant: dict | None, in_proj: bool | dict, split: str,
               limit: int | None, vector: str = "", lam: float | None = None) -> str:
    """The content key of one result row: everything that determines the number, nothing else."""
    return content_key("result", {
        "kind": kind, "state": state, "head": head, "quant": quant, "in_proj": in_proj, "split": split,
        "limit": limit, "vector": vector, "lam": None if lam is None else lam_key(lam),
    })


def lambdas_on_test(params: Mapping, chosen: Mapping[str, float] | float | None) -> list[float]:
    """The lambdas a pair is evaluated at on test: 1 (zero-shot), every rule's choice (lambda* included), and
    every lambda of the grid if asked. lambda = 0 is never tested: it is the FT+PTQ baseline."""
    if chosen is None:
        chosen = {}
    elif not isinstance(chosen, Mapping):  # a bare lambda*
        chosen = {"val": float(chosen)}
    lams = {lam_key(1.0): 1.0}
    lams.update({lam_key(v): float(v) for v in chosen.values() if float(v) != 0.0})
    if params["test_lambdas"] == "all":
        lams.update({lam_key(v): float(v) for v in params["lambdas"]})
    return sorted(lams.values())


def pair_rules(params: Mapping) -> list[LambdaRule]:
    """The rules a cells job measures (``one`` and ``val`` for jobs planned before rules existed)."""
    if params.get("rules"):
        return [get_rule(n) for n in params["rules"]]
    return rule_list([], params["select_lambda"])


def score_lambdas(params: Mapping) -> list[float]:
    """The lambdas the label-free signals are measured at: 0 (no patch) and the grid."""
    return sorted({0.0, *map(float, params["lambdas"])}) if params.get("signals") else []


def score_key(params: Mapping, signal: str, measure: str, lam: float) -> str:
    """Key of one label-free score of Q(theta_FT^R + lam * tau_D) against FT (see :mod:`qvec.vectors.signals`)."""
    src = params["signals"][signal]
    return content_key("result", {
        "kind": "score", "state": params["receiver_ft_key"], "quant": params["quant"],
        "in_proj": params["include_in_proj"], "signal": signal, "measure": measure, "source": src.get("id", ""),
        "limit": src.get("size"), "vector": params["vector_key"], "lam": lam_key(lam)})


def score_keys(params: Mapping) -> dict[str, tuple[str, float]]:
    """Every score key of a cells job -> (metric, lambda)."""
    out = {}
    for signal in params.get("signals", {}):
        for measure in measures_of(signal):
            for lam in score_lambdas(params):
                out[score_key(params, signal, measure, lam)] = (f"{signal}.{measure}", lam)
    return out


def cell_key(params: Mapping, lam: float, split: str) -> str:
    """Key of the patched result Q(theta_FT^R + lam * tau_D) on ``split`` for a ``cells`` job."""
    limit = params["val_limit"] if split == "val" else params["test_limit"]
    return result_key("patched", state=params["receiver_ft_key"], head=params["receiver_ft_key"],
                      quant=params["quant"], in_proj=params["include_in_proj"], split=split, limit=limit,
                      vector=params["vector_key"], lam=lam)


def baseline_items(params: Mapping) -> list[dict]:
    """The rows a ``baseline`` job produces: kind, the state it evaluates, and the row key."""
    items = []
    sources = {"ft": params["receiver_ft_key"], "pretrained": params["theta0_key"],
               "ft_ptq": params["receiver_ft_key"], "qat_ptq": params.get("qat_key", ""),
               "pretrained_ptq": params["theta0_key"]}
    for kind in params["kinds"]:
        quant = params["quant"] if kind.endswith("_ptq") else None
        key = result_key(kind, state=sources[kind], head=params["receiver_ft_key"], quant=quant,
                         in_proj=params["include_in_proj"], split="test", limit=params["test_limit"])
        items.append({"kind": kind, "key": key, "quant": quant})
    return items


def cell_choices(params: Mapping, lookup: Lookup) -> tuple[dict[float, float], dict[str, dict[float, float]],
                                                            bool]:
    """A cells job's stored validation accuracies and scores, and whether all of them are there."""
    val_keys = {cell_key(params, lam, "val"): lam for lam in params["lambdas"]} if params["select_lambda"] else {}
    sk = score_keys(params)
    have = lookup([*val_keys, *sk])
    scores: dict[str, dict[float, float]] = {}
    for k, (metric, lam) in sk.items():
        if k in have:
            scores.setdefault(metric, {})[lam] = have[k]
    val = {lam: have[k] for k, lam in val_keys.items() if k in have}
    return val, scores, len(have) == len(val_keys) + len(sk)


def cell_result_keys(params: Mapping, lookup: Lookup) -> list[str] | None:
    """Every result key a ``cells`` job stands for, or None while not knowable: its test lambdas depend on its
    validation results and scores, so its keys are known only once those are all stored."""
    val, scores, complete = cell_choices(params, lookup)
    if not complete:
        return None
    val_keys = [cell_key(params, lam, "val") for lam in params["lambdas"]] if params["select_lambda"] else []
    chosen = choices(pair_rules(params), val, scores)
    return [*val_keys, *score_keys(params), *(cell_key(params, lam, "test") for lam in lambdas_on_test(params, chosen))]


def cell_candidate_keys(params: Mapping) -> list[str]:
    """Every row key a cells job might produce (all lambdas on val and test): what a worker may reuse."""
    lams = [*params["lambdas"], 1.0]
    return ([cell_key(params, lam, "val") for lam in params["lambdas"]] + list(score_keys(params))
            + [cell_key(params, lam, "test") for lam in lams])
