"""
Hugging Face transformers: route a Mixtral, read its statistics, make it AdaMoE
===============================================================================

:mod:`moerouter_torch.integrations.transformers` routes any transformers 5 MoE model through
moerouter in one call, without touching its weights. Here a tiny, randomly initialised Mixtral
(2 layers, 4 experts, ``k = 2``; no download) is

1. routed through moerouter with the policy that reproduces its own routing, and checked to
   give the original logits;
2. watched with :func:`~moerouter_torch.integrations.transformers.routing_statistics`, which
   collects :func:`moerouter.stats.summary` per layer;
3. converted to AdaMoE with
   :func:`~moerouter_torch.integrations.transformers.to_adamoe` (8 null experts per layer,
   ``k = 4``) and fine-tuned for a few steps on a toy sequence task, with the null-aware
   balancing loss the conversion attaches. Each layer's real experts per token can now move
   away from Mixtral's fixed 2.
"""

import copy

import matplotlib.pyplot as plt
import numpy as np
import torch
from moerouter_torch.integrations.transformers import (
    route_with_moerouter,
    routing_statistics,
    to_adamoe,
)
from transformers import MixtralConfig, MixtralForCausalLM

torch.set_num_threads(
    1
)  # matrices this small run faster without thread synchronisation
torch.manual_seed(0)
config = MixtralConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
)
original = MixtralForCausalLM(config).eval()
model = route_with_moerouter(
    copy.deepcopy(original)
)  # Mixtral's own routing, by moerouter

# A toy task: sequences that count up from a random start, modulo the vocabulary.
ids = (torch.randint(0, 64, (16, 1)) + torch.arange(24)) % 64
with torch.no_grad(), routing_statistics(model) as mixtral:
    expected, actual = original(ids).logits, model(ids).logits
error = ((actual - expected).abs().max() / expected.abs().max()).item()
print(
    "routed through moerouter: max relative difference to the original logits "
    f"{error:.1e}"
)
for name, row in mixtral.summary().items():
    print(
        f"{name}: tokens per expert {row['tokens_per_expert']}, "
        f"load cv {row['load_cv']:.2f}"
    )

# %%
# Now AdaMoE: 8 null experts per layer and ``k = 4``. The null rows of each router start as
# copies of the real rows, so right after the conversion every token still reaches 2 real
# experts; fine-tuning with the balancing loss lets each layer find its own number.
to_adamoe(model, num_null=8, k=4, aux_loss_coef=0.5)
model.train()
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
losses = []
with routing_statistics(model) as training:
    for _ in range(40):
        out = model(ids, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
for offset, (name, row) in enumerate(mixtral.summary().items()):
    load = np.asarray(row["tokens_per_expert"])
    left.bar(np.arange(load.size) + (offset - 0.5) * 0.4, load, width=0.4, label=name)
    per_step = [
        float(stats["real_experts_per_token"]) for _, stats in training.records[name]
    ]
    right.plot(per_step, label=name)
    print(f"{name}: real experts per token {per_step[0]:.2f} -> {per_step[-1]:.2f}")
left.set_title("Mixtral routing: tokens per expert", fontsize=10)
left.set_xlabel("expert")
left.set_xticks(range(config.num_local_experts))
left.legend(fontsize=8)
right.axhline(2, color="grey", lw=0.8)
right.set_title(
    "after to_adamoe: real experts per token while fine-tuning", fontsize=10
)
right.set_xlabel("step")
right.legend(fontsize=8)
plt.show()
print(f"training loss {losses[0]:.2f} -> {losses[-1]:.2f}")

# %%
# The balancing loss the conversion attached (null-aware, with the null experts pooled as one
# bucket) trades real experts for null ones where the task allows it: each layer settles on its
# own number of real experts per token, below Mixtral's fixed 2, while the language-model loss
# keeps falling. :func:`~moerouter_torch.integrations.transformers.from_adamoe` turns the model
# back into plain top-k routing, and ``remove_moerouter`` restores the original forwards.
