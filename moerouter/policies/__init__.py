"""Router policies: each turns router logits into a :class:`moerouter.Routing`.

Every policy is a frozen dataclass of its hyper-parameters, validated on creation, and a pure
function of the logits when called. One module per family:

- :mod:`~moerouter.policies.topk`: :class:`TopK`, softmax or sigmoid token choice with capacity.
- :mod:`~moerouter.policies.null`: :class:`NullExperts`, AdaMoE's null-expert adaptive routing.
- :mod:`~moerouter.policies.expert_choice`: :class:`ExpertChoice`, experts pick their tokens.
"""

from moerouter.policies.expert_choice import ExpertChoice
from moerouter.policies.null import NullExperts
from moerouter.policies.topk import TopK

__all__ = ["ExpertChoice", "NullExperts", "TopK"]
