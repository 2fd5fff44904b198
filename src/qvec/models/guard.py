"""Building a model that a file's header (or a user's flags) describes, without trusting the description.

A checkpoint's ``qvec.model`` header names a family, an architecture and constructor options. Built as asked,
a header that asks for a depth of a billion or a width of a million makes the process allocate until the machine
stops it. So before any memory is allocated:

1. the option keys must be arguments the family's constructor takes (:meth:`ModelAdapter.check_options`), and
   every whole number among the values must be at most the number of values the file holds (no architecture
   size exceeds its own parameter count);
2. the model is built on the meta device (no memory), under registration hooks that stop the build once it has
   registered more parameter and buffer values than the file holds (with slack for buffers a file does not
   store), or absurdly many modules;
3. its state-dict keys and shapes are compared with the file's tensors (one line naming the first difference);
4. its size in bytes is compared with the memory available (:func:`qvec.core.limits.check_fits`).

Only then is the model built for real. Without a file (a model named on the command line), the budget is what the
machine can hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from qvec.core.errors import QvecError
from qvec.core.limits import available_memory, check_fits, human_bytes
from qvec.core.spec import ModelSpec
from qvec.models.base import get_adapter
from qvec.models.loading import check_state_matches

#: Values a model may hold beyond what its file stores (buffers such as position ids that are not saved).
SLACK_ELEMENTS = 1 << 24
#: Modules a model may create per tensor its file holds (with a floor for files that hold few).
MODULES_PER_TENSOR = 8
MIN_MODULE_BUDGET = 10_000


class _BudgetExceeded(Exception):
    """Raised inside a constructor by the registration hooks; turned into a one-line QvecError."""


def _file_elements(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(t.numel()) for t in state.values())


def check_option_sizes(spec: ModelSpec, limit: int, source: str) -> None:
    """Every whole number among ``spec``'s options (nested ones too) must be at most ``limit``: an architecture
    size (depth, width, heads, image size, vocabulary) never exceeds the number of values the model holds."""

    def walk(value, where: str) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int) and abs(value) > limit:
            raise QvecError(f"{source}: model option {where} = {value:,} is larger than any size a model of "
                            f"{limit:,} values can have")
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    for key, value in spec.options.items():
        walk(value, key)


def meta_build(spec: ModelSpec, state: Mapping[str, torch.Tensor] | None = None, source: str | None = None,
               match_state: bool = True) -> nn.Module:
    """``spec``'s model on the meta device (no memory, no weights), checked as the module docstring says; with
    ``state`` (a file's tensors) its sizes are bounded by the file's and (``match_state``) its keys and shapes
    must match them."""
    source = source or str(spec)
    adapter = get_adapter(spec)
    try:
        adapter.check_options(spec)
    except QvecError as e:
        raise QvecError(f"{source}: {e}" if source != str(spec) else str(e)) from None
    if state is not None:
        elements = _file_elements(state)
        budget, modules = 2 * elements + SLACK_ELEMENTS, max(MIN_MODULE_BUDGET, MODULES_PER_TENSOR * len(state))
        check_option_sizes(spec, max(elements, 1 << 16), source)
        what = f"its file holds {elements:,} values"
    else:
        budget, modules = available_memory() // 4, 1_000_000
        what = f"this machine can hold about {budget:,} float32 values ({human_bytes(4 * budget)} available)"
    counted = {"elements": 0, "modules": 0}

    def count_tensor(_module, _name, value):
        if value is not None:
            counted["elements"] += int(value.numel())
            if counted["elements"] > budget:
                raise _BudgetExceeded(f"more than {budget:,} values")

    def count_module(_module, _name, _sub):
        counted["modules"] += 1
        if counted["modules"] > modules:
            raise _BudgetExceeded(f"more than {modules:,} modules")

    hooks = [torch_module.register_module_parameter_registration_hook(count_tensor),
             torch_module.register_module_buffer_registration_hook(count_tensor),
             torch_module.register_module_module_registration_hook(count_module)]
    try:
        with torch.device("meta"):
            model = adapter.build(spec, pretrained=False)
    except _BudgetExceeded as e:
        raise QvecError(f"{source}: a {spec} model with options {spec.options} would hold {e} ({what})") from None
    except QvecError as e:  # the family's own check of an option: say which file asked for it
        raise QvecError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
    except Exception as e:  # a constructor's own complaint about an option (TypeError, AssertionError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QvecError(f"{source}: cannot build {spec} with options {spec.options}: {first[:200]}") from None
    finally:
        for h in hooks:
            h.remove()
    if state is not None and match_state:
        check_state_matches(model.state_dict(), dict(state), source)
    return model


def check_model_fits(model: nn.Module, source: str) -> int:
    """The bytes a (meta) model's parameters and buffers take once built for real; refused when more than the
    machine has available."""
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    check_fits(nbytes, f"{source}: building this model")
    return nbytes
