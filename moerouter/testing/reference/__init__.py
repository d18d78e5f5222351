"""Float64 loop references for every policy, the plan, dispatch, combine, losses, stats and methods.

Each function here is written from the public contract (DESIGN.md and the docstrings of the
policies, :mod:`moerouter.losses`, :mod:`moerouter.stats` and :mod:`moerouter.methods`), one token
or one expert at a time in plain Python and NumPy float64, and shares no code with
:mod:`moerouter._agnostic`. They are slow and obvious on purpose: a backend kernel that agrees with
them agrees with the contract. One module per subject:

``token_choice`` (top-k, null experts, DeepSeek, GShard, hash), ``expert_choice``, ``adaptive``
(top-p, ReLU routing, causal expert choice), ``transport`` (Sinkhorn, balanced assignment,
sparsity-constrained), ``soft`` (Soft MoE), ``locality`` (LocMoE), ``gates`` (noise, cosine
logits), ``plan`` (make_plan, dispatch, combine), ``capacity``, ``losses``, ``stats``,
``methods`` (confidence, distillation, multitask, MEMoE), ``ensemble`` (BTM), ``merging``
(MC-SMoE) and ``edge_cases``. Every name is also importable from this package.

Conventions shared by all of them:

* Inputs may be NumPy arrays or arrays of any backend (they are copied to NumPy first); a routing
  or plan may be a :class:`moerouter.Routing` / :class:`moerouter.Plan` or a dict returned here.
* Logits are first rounded to float32, as every policy does, and selection ranks those float32
  values (ties go to the lower index). Probabilities, weights and losses are then computed in
  float64 from them.
* Decisions that compare probabilities of *different* tokens (expert choice, ``drop_policy=
  "probs"``) rank the float64 probabilities: they agree with a float32 backend whenever no two
  such probabilities are within float32 rounding of each other, and always for tokens whose logits
  rows are identical (DESIGN.md, "Expert choice ranks tokens ...").
* Returned dicts hold NumPy arrays: int32 indices, bool masks, float64 values.

The private helpers the single ``reference.py`` module used to define (``_routing``,
``_softmax``, ...) are re-exported here for older branches; new code imports them from
``moerouter.testing.reference._common``.
"""

from __future__ import annotations

# as_dict, and the private helpers the single reference.py used to define (older branches).
from moerouter.testing.reference._common import (  # noqa: F401
    PLAN_ARRAYS,
    ROUTING_ARRAYS,
    ROUTING_STATICS,
    _descending,
    _grouped_float32,
    _plan,
    _ranked_columns,
    _routing,
    _row_is_finite,
    _sigmoid,
    _softmax,
    as_dict,
)
from moerouter.testing.reference.adaptive import *  # noqa: F403
from moerouter.testing.reference.capacity import *  # noqa: F403
from moerouter.testing.reference.edge_cases import *  # noqa: F403
from moerouter.testing.reference.ensemble import *  # noqa: F403
from moerouter.testing.reference.expert_choice import *  # noqa: F403
from moerouter.testing.reference.expert_choice import _expert_layout  # noqa: F401
from moerouter.testing.reference.gates import *  # noqa: F403
from moerouter.testing.reference.locality import *  # noqa: F403
from moerouter.testing.reference.losses import *  # noqa: F403
from moerouter.testing.reference.losses import (  # noqa: F401
    _balance,
    _counted_pairs,
    _flat_mask,
    _normalised_row,
)
from moerouter.testing.reference.merging import *  # noqa: F403
from moerouter.testing.reference.methods import *  # noqa: F403
from moerouter.testing.reference.plan import *  # noqa: F403
from moerouter.testing.reference.soft import *  # noqa: F403
from moerouter.testing.reference.stats import *  # noqa: F403
from moerouter.testing.reference.token_choice import *  # noqa: F403
from moerouter.testing.reference.token_choice import _softmax_of_routed, _token_choice  # noqa: F401
from moerouter.testing.reference.transport import *  # noqa: F403

# Every public function the star imports above brought in, and as_dict.
__all__ = sorted(
    name for name, value in globals().items() if callable(value) and not name.startswith("_")
)
