"""Router policies: each turns router logits into a :class:`moerouter.Routing`.

Every policy is a frozen dataclass of its hyper-parameters, validated on creation, and a pure
function of the logits when called. One module per family:

- :mod:`~moerouter.policies.topk`: :class:`TopK`, softmax or sigmoid token choice with capacity.
- :mod:`~moerouter.policies.null`: :class:`NullExperts`, AdaMoE's null-expert adaptive routing.
- :mod:`~moerouter.policies.expert_choice`: :class:`ExpertChoice`, experts pick their tokens.
- :mod:`~moerouter.policies.anchor`: :class:`AnchorRouting`, MEMoE's knowledge-anchor routing
  around any policy.
- :mod:`~moerouter.policies.locality`: :class:`LocalityTopK` and :class:`AffinityRouting`,
  LocMoE / LocMoE+ locality and affinity routing.
"""

from moerouter.policies.anchor import AnchorRouting, anchor_mean_logits, anchor_router_input
from moerouter.policies.expert_choice import ExpertChoice
from moerouter.policies.locality import (
    AffinityRouting,
    LocalityTopK,
    affinity_scores,
    grouped_average_pooling,
    locality_loss,
)
from moerouter.policies.null import NullExperts
from moerouter.policies.topk import TopK

__all__ = [
    "AffinityRouting",
    "AnchorRouting",
    "ExpertChoice",
    "LocalityTopK",
    "NullExperts",
    "TopK",
    "affinity_scores",
    "anchor_mean_logits",
    "anchor_router_input",
    "grouped_average_pooling",
    "locality_loss",
]
