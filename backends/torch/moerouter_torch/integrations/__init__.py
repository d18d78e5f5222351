"""Integrations of moerouter with model libraries; each is imported on its own.

- :mod:`moerouter_torch.integrations.transformers`: route a Hugging Face ``transformers`` MoE
  model through moerouter (any policy, AdaMoE conversion, routing statistics).
"""
