"""Lambda rules: how the scale of a quantization vector is chosen, as one registry that grids, reports and the CLI
share.

A rule reads one *metric* measured at every candidate lambda (or none, for a fixed lambda) and picks a candidate.
Metrics are named ``signal.measure``, a signal of :mod:`qvec.vectors.signals` measured on the candidate
Q(theta_FT^R + lam * tau) with the deploy quantizer Q (``val.top1``, ``probe.kl``, ``unlabeled.agree``,
``noise.kl``, ``weight.err``, or a plugin's).

Label-free rules have lambda = 0 among their candidates: "do not patch" is a choice, so a harmful vector is
refused rather than applied.

A new rule is one function and one registration (in a module that ``$QVEC_PLUGINS`` names, so that the grid's
worker processes import it too; see :mod:`qvec.core.plugins`)::

    @register_rule("my-rule")
    def _my_rule(arg: str | None) -> LambdaRule:
        return LambdaRule("my-rule", metric="probe.kl", higher_is_better=False, uses=USES_GENERIC)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from qvec.core.errors import QvecError
from qvec.core.registry import Registry
from qvec.vectors.signals import SIGNALS, USES_GENERIC, USES_INPUTS, USES_LABELS, USES_NOTHING

#: SPEC section 7: the lambda grid (lambda* is chosen over it on the receiver's validation split); every rule's
#: candidates unless told otherwise.
DEFAULT_LAMBDAS: tuple[float, ...] = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.00, 1.05, 1.20, 1.35, 1.50)

#: The donor name of the mean of every other donor's vector (a receiver's own vector is never in it).
MEAN_DONOR = "mean"


def lam_key(lam: float) -> str:
    """Canonical text of a lambda (so 0.3 and 0.30000000000000004 are one cell)."""
    return f"{float(lam):.6g}"


def select_lambda(val: Mapping[float, float]) -> float:
    """lambda* = the lambda with the best validation accuracy; ties go to the one closest to 1, then the smaller.

    Preferring lambda = 1 on ties keeps the selection from moving away from the zero-shot setting on noise.
    """
    if not val:
        raise QvecError("cannot choose lambda*: no validation results")
    return min(val, key=lambda lam: (-val[lam], abs(lam - 1.0), lam))


@dataclass(frozen=True)
class LambdaRule:
    """A way to choose lambda: the metric it reads, its direction, its candidates and the data it needs."""

    name: str
    #: ``signal.measure`` (see the module docstring); None for a fixed lambda
    metric: str | None = None
    higher_is_better: bool = True
    #: lambda = 0 (no patch) is a candidate
    with_zero: bool = True
    #: the fixed lambda of a rule without metric
    value: float | None = None
    #: what receiver-side data the rule uses: one of USES_*
    uses: str = USES_NOTHING
    description: str = ""

    def __post_init__(self) -> None:
        if (self.metric is None) == (self.value is None):
            raise QvecError(f"lambda rule {self.name!r} needs either a metric or a fixed value")
        if self.metric is not None:
            signal, _, measure = self.metric.partition(".")
            if signal not in SIGNALS or measure not in SIGNALS.get(signal).measures:
                known = ", ".join(f"{s}.{m}" for s, cls in SIGNALS.items() for m in cls.measures
                                  if s not in ("test", "train"))
                raise QvecError(f"lambda rule {self.name!r}: unknown metric {self.metric!r} (known: {known})")

    @property
    def signal(self) -> str | None:
        return None if self.metric is None else self.metric.split(".")[0]

    @property
    def measure(self) -> str | None:
        return None if self.metric is None else self.metric.split(".")[1]

    @property
    def zero_shot(self) -> bool:
        """True when the rule uses no receiver data at all (generic images and noise are not receiver data)."""
        return self.uses in (USES_NOTHING, USES_GENERIC)

    def candidates(self, lambdas: Iterable[float]) -> list[float]:
        """The lambdas this rule chooses among: the grid, with 0 first for label-free rules."""
        if self.value is not None:
            return [float(self.value)]
        lams = sorted({lam_key(v): float(v) for v in lambdas}.values())
        if self.with_zero and 0.0 not in lams:
            lams = [0.0, *lams]
        return lams

    def choose(self, scores: Mapping[float, float] | None = None) -> float:
        """The chosen lambda given the metric at each candidate (ignored by fixed rules).

        Ties go to the smaller lambda (the smaller change), except for the validation rule, whose SPEC tie-break
        (:func:`select_lambda`) prefers lambda = 1.
        """
        if self.value is not None:
            return float(self.value)
        if not scores:
            raise QvecError(f"lambda rule {self.name!r}: no {self.metric} scores to choose from")
        if self.signal == "val":
            return select_lambda(scores)
        sign = -1.0 if self.higher_is_better else 1.0
        return min(scores, key=lambda lam: (sign * scores[lam], lam))

    def label(self) -> str:
        """How reports name the rule, with the receiver data it uses."""
        return f"{self.name} ({self.uses})" if self.uses != USES_NOTHING else self.name


RuleFactory = Callable[[str | None], LambdaRule]
RULES: Registry[RuleFactory] = Registry("lambda rule", builtins=("qvec.vectors.rules",))


def register_rule(name: str) -> Callable[[RuleFactory], RuleFactory]:
    """Register a rule factory under ``name``; ``name:ARG`` passes ARG to it (``fixed:0.5``, ``agree:top1``)."""
    return RULES.register(name)  # type: ignore[return-value]


def rule_names() -> list[str]:
    return sorted(RULES.names())


def get_rule(spec: str | LambdaRule) -> LambdaRule:
    """The rule named ``spec`` (``name`` or ``name:ARG``); one clear error for a name that does not exist."""
    if isinstance(spec, LambdaRule):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise QvecError(f"a lambda rule must be a name such as 'agree', got {spec!r}")
    name, _, arg = spec.strip().partition(":")
    if name not in RULES:
        raise QvecError(f"unknown lambda rule {spec!r}; known: {', '.join(rule_names())} (fixed takes fixed:X)")
    return RULES.get(name)(arg or None)


def _no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise QvecError(f"lambda rule {name!r} takes no argument, got {name}:{arg}")


@register_rule("one")
def _one(arg: str | None) -> LambdaRule:
    _no_arg("one", arg)
    return LambdaRule("one", value=1.0, description="lambda = 1, the paper's zero-shot setting")


@register_rule("fixed")
def _fixed(arg: str | None) -> LambdaRule:
    try:
        value = float(arg) if arg is not None else None
    except ValueError:
        value = None
    if value is None or value != value or abs(value) == float("inf"):
        raise QvecError(f"lambda rule 'fixed' needs a finite number, as in fixed:0.5, got fixed:{arg or ''}")
    return LambdaRule(f"fixed:{value:g}", value=value, description=f"lambda = {value:g}")


@register_rule("val")
def _val(arg: str | None) -> LambdaRule:
    _no_arg("val", arg)
    return LambdaRule("val", metric="val.top1", with_zero=False, uses=USES_LABELS,
                      description="lambda* on the receiver's labelled validation split (SPEC section 7)")


def _measure_arg(name: str, arg: str | None) -> tuple[str, bool]:
    """``agree`` scores by KL (lower is better) by default; ``agree:top1`` by top-1 agreement."""
    if arg in (None, "kl"):
        return "kl", False
    if arg == "top1":
        return "agree", True
    raise QvecError(f"lambda rule {name!r} takes kl or top1, got {name}:{arg}")


def _agreement_rule(name: str, signal: str, uses: str, what: str) -> RuleFactory:
    def factory(arg: str | None) -> LambdaRule:
        measure, higher = _measure_arg(name, arg)
        full = name if arg is None else f"{name}:{arg}"
        how = "KL divergence" if measure == "kl" else "top-1 agreement"
        return LambdaRule(full, metric=f"{signal}.{measure}", higher_is_better=higher, uses=uses,
                          description=f"{how} of PTQ(patched) with the FT model on {what}; lambda = 0 included")

    return register_rule(name)(factory)


_agreement_rule("agree", "probe", USES_GENERIC, "generic unlabeled probe images")
_agreement_rule("agree-unlabeled", "unlabeled", USES_INPUTS, "the receiver's own unlabeled inputs")
_agreement_rule("agree-noise", "noise", USES_NOTHING, "generated uniform noise")


@register_rule("weight")
def _weight(arg: str | None) -> LambdaRule:
    _no_arg("weight", arg)
    return LambdaRule("weight", metric="weight.err", higher_is_better=False,
                      description="no images: the mean over layers of log(||Q(FT + lam tau) - FT|| / "
                                  "||Q(FT) - FT||), i.e. how close the quantized patched weights stay to FT's")


def signals_of(rules: Iterable[LambdaRule]) -> list[str]:
    """The label-free signals a set of rules needs measured, in registry order (``val`` is the labelled split)."""
    need = {r.signal for r in rules if r.signal and r.signal != "val"}
    return [s for s in SIGNALS.names() if s in need]


def rule_list(names: Iterable[str], select_lambda: bool = True) -> list[LambdaRule]:
    """``one``, ``val`` (while lambda* is chosen) and the rules ``names``, each once, in that order."""
    out: dict[str, LambdaRule] = {}
    for n in ["one", *(["val"] if select_lambda else []), *names]:
        r = get_rule(n)
        out.setdefault(r.name, r)
    return list(out.values())


def choices(rules: Iterable[LambdaRule], val: Mapping[float, float],
            scores: Mapping[str, Mapping[float, float]]) -> dict[str, float]:
    """Each rule's lambda for one (donor, receiver) pair, from its validation accuracies and label-free scores by
    metric (workers, plans and reports all call this, so they agree on what was chosen); a rule whose scores are
    missing is left out."""
    out = {}
    for r in rules:
        if r.metric is None:
            out[r.name] = r.choose()
        elif r.signal == "val":
            if val:
                out[r.name] = r.choose(val)
        else:
            by = scores.get(r.metric, {})
            if by:
                out[r.name] = r.choose(by)
    return out


def uses_label(rule: LambdaRule, probe: str = "") -> str:
    """What receiver-side data a rule used, as tables and ``qvec patch`` say it: a probe rule run on a noise probe
    used generated noise, not generic images."""
    from qvec.data.probe import NOISE  # here, not at the top: this module loads without torch

    if rule.uses == USES_GENERIC and str(probe).strip().lower() == NOISE:
        return "nothing (noise probe)"
    return rule.uses
