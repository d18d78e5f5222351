import numpy as np

import moerouter as mr
from moerouter.testing import to_numpy


def test_topk_runs_on_every_backend(backend, xp):
    # The fixture matrix itself: every installed backend can route and read back.
    logits = backend.asarray(np.asarray([[1.0, 3.0, 3.0, 0.0]], dtype=np.float32))
    routing = mr.TopK(num_experts=4, k=2)(logits)
    assert to_numpy(routing.expert_ids).tolist() == [1, 2]
