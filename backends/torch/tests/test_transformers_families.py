"""Every MoE family of the installed transformers: listed, routed or refused as the table says.

The table is ``moerouter_torch.integrations.transformers_families.FAMILIES`` (the docs' support
table is generated from it). Each family is built as a tiny random model (2 MoE-covering layers,
hidden size 32, 8 experts, k = 2) from its default configuration, shrunk generically.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moerouter_torch.integrations.transformers import (  # noqa: E402
    _router_linear,
    route_with_moerouter,
    to_adamoe,
)
from moerouter_torch.integrations.transformers_families import (  # noqa: E402
    FAMILIES,
    moe_families,
)
from transformers.models.auto import configuration_auto  # noqa: E402

VOCAB = 64
# Values every family's config gets when it has the field (derived fields follow: the config
# is rebuilt through its constructor).
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 24,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "moe_shared_expert_intermediate_size": 24,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_local_experts": 8,
    "num_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "max_position_embeddings": 64,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "decoder_sparse_step": 1,
    "moe_layer_freq": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": None,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "n_group": 4,
    "topk_group": 2,
    "expert_ffn_hidden_size": 16,
    "index_n_heads": 2,  # the sparse-attention indexer (DeepSeek-V3.2 and its kin)
    "index_head_dim": 8,
    "index_topk": 8,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "mlp_only_layers": [],
    "use_cache": False,
}


def _mrope(sections):
    # M-RoPE sections (temporal, height, width) that fit the tiny head_dim (8: 4 frequencies).
    return lambda config: {**(config.rope_parameters or {}), "mrope_section": sections}


# Fields a family's default config leaves unset (None) or sized for the full model, that the
# generic shrinking above does not reach; a callable gets the config.
OVERRIDES = {
    # transformers 5.23's DBRX attention reads attn_config.rope_theta, which its config class
    # does not define, and clamps by clip_qkv, which defaults to None: both given here.
    "dbrx": {
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 64,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 8, "moe_top_k": 2},
    },
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},
    "dots1": {"n_shared_experts": 1},
    "ernie4_5_vl_moe": {"rope_parameters": _mrope([1, 1, 2])},
    "glm4v_moe": {"rope_parameters": _mrope([1, 1, 0])},
    "mistral_large4": {"num_hidden_layers": 2, "first_k_dense_replace": 0},
    "gemma4": {"enable_moe_block": True, "top_k_experts": 2},  # MoE is off by default
    "granitemoehybrid": {  # Mamba heads x head size = 2 x hidden size
        "mamba_n_heads": 4,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
        "mamba_n_groups": 1,
        "mamba_chunk_size": 16,
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},
    "qwen4_exp": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
    },
    "step3p7": {"sliding_window": 8},
}


def _get(config, key):
    try:
        return True, getattr(config, key)
    except Exception:  # missing, or a per-layer attribute that refuses a global read
        return False, None


def _set(config, key, value):
    try:
        setattr(config, key, value)
    except Exception:  # read-only property (Jamba's layer_types)
        pass


def _tiny(config, overrides=None):
    layers_key = next((k for k in ("num_hidden_layers", "num_layers") if _get(config, k)[0]), None)
    old_layers = _get(config, layers_key)[1] if layers_key else None
    mla = _get(config, "qk_rope_head_dim")[0]
    for key, value in TINY.items():
        there, old = _get(config, key)
        if there and not isinstance(old, dict) and not (key == "head_dim" and mla):
            _set(config, key, value)
    if mla:  # multi-head latent attention: rope width is the head_dim transformers reads
        _set(config, "head_dim", config.qk_rope_head_dim)
        # and no grouped-query attention: the expanded keys have every head
        _set(config, "num_key_value_heads", config.num_attention_heads)
        if _get(config, "qk_nope_head_dim")[0]:
            _set(config, "qk_head_dim", config.qk_rope_head_dim + config.qk_nope_head_dim)
    # Per-layer lists: keep the fewest layers that still cover every kind of each list.
    lists = {
        key: value
        for key, value in vars(config).items()
        if isinstance(value, list)
        and value
        and len(value) == old_layers
        and not isinstance(value[0], (dict, list))
    }
    chosen: list[int] = []
    for value in lists.values():
        for item in dict.fromkeys(value):
            if not any(value[i] == item for i in chosen):
                chosen.append(value.index(item))
    chosen = sorted(chosen) or [0, 1]
    if len(chosen) == 1:
        chosen *= 2
    for key, value in lists.items():
        _set(config, key, [value[i] for i in chosen])
    if layers_key:
        _set(config, layers_key, len(chosen))
    for key, value in (overrides or {}).items():
        _set(config, key, value(config) if callable(value) else value)
    data = config.to_dict()
    data.pop("model_type", None)
    data.pop("transformers_version", None)
    try:
        return type(config)(**data)
    except Exception:
        return config


def _model_class(family, config):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, transformers.PreTrainedModel)
        and getattr(value, "config_class", None) is type(config)
        and not value.__name__.endswith("PreTrainedModel")
    ]
    for suffix in ("ForCausalLM", "Model"):
        for value in classes:
            if value.__name__.endswith(suffix):
                return value
    raise LookupError(f"no model class for {type(config).__name__}")


def build_tiny(family, **overrides):
    model_types = [
        key
        for key in configuration_auto.CONFIG_MAPPING_NAMES
        if configuration_auto.model_type_to_module_name(key) == family
    ]
    # the family's own config, else its text model's (Inkling: audio, text, vision, ...)
    model_type = next(
        (key for key in model_types if key == family),
        next((key for key in model_types if key.endswith("_text")), model_types[0]),
    )
    config = configuration_auto.CONFIG_MAPPING[model_type]()
    overrides = {**OVERRIDES.get(family, {}), **overrides}
    config = _tiny(getattr(config, "text_config", None) or config, overrides)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model_class(family, config)(config).float().eval()
    # Some families initialise their routers to zero: every logit ties, which says nothing.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "experts", None), torch.nn.Module):
                for name in ("gate", "router"):
                    linear = _router_linear(getattr(module, name, torch.nn.Module()))
                    if linear is not None:
                        linear.weight.copy_(
                            0.5 * torch.randn(linear.weight.shape, generator=generator)
                        )
    return model


def _tokens(batch=2, length=12, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _output(model, ids):
    # an encoder-decoder (Switch Transformers, NLLB-MoE) decodes the same ids
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    out = model(ids, **extra)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _relative_error(actual, expected):
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def _weighted_sum(output):
    weights = torch.linspace(-1.0, 1.0, output.numel()).reshape(output.shape)
    return (output * weights).sum()


def _families(status):
    installed = set(moe_families())
    return sorted(
        name for name, family in FAMILIES.items() if family.status == status and name in installed
    )


def test_every_moe_family_is_listed_with_a_reason():
    # A new transformers release that adds an MoE family fails here until the table says what
    # moerouter does with it.
    installed = moe_families()
    assert len(installed) > 40  # the scan itself works
    missing = [name for name in installed if name not in FAMILIES]
    assert not missing, f"MoE families not in transformers_families.FAMILIES: {missing}"
    for name, family in FAMILIES.items():
        if family.status == "supported":
            assert family.policy in ("TopK", "DeepSeekTopK"), name
        else:
            assert len(family.refused or family.not_built) > 20, name


@pytest.mark.parametrize("family", _families("supported"))
def test_supported_family_matches_the_original(family):
    expected_family = FAMILIES[family]
    reference = build_tiny(family)
    routed = route_with_moerouter(copy.deepcopy(reference))
    policies = {
        block.default_policy for block in routed.__dict__["_moerouter_state"].blocks.values()
    }
    assert {(type(p).__name__, p.score) for p in policies} == {
        (expected_family.policy, expected_family.score)
    }
    ids = _tokens()
    expected, actual = _output(reference, ids), _output(routed, ids)
    assert _relative_error(actual, expected) <= 1e-5
    _weighted_sum(expected).backward()
    _weighted_sum(actual).backward()
    pairs = [
        (name, param.grad, routed_param.grad)
        for (name, param), (_, routed_param) in zip(
            reference.named_parameters(), routed.named_parameters(), strict=True
        )
        if param.grad is not None and param.grad.abs().max() > 0
    ]
    assert pairs
    # A gradient many orders of magnitude below the model's largest is mostly the rounding of
    # terms that cancel in it (hy_v4's attn_hc.scale: 1.6e-5 against 37, off by 2e-10 = 1.3e-5
    # of itself on one machine, within 1e-5 on another): the error is measured against its own
    # scale, with a floor of a tenth of float32's epsilon times the largest gradient.
    floor = 1e-8 * max(float(expected_grad.abs().max()) for _, expected_grad, _ in pairs)
    for name, expected_grad, actual_grad in pairs:
        error = float((actual_grad - expected_grad).abs().max())
        assert error <= 1e-5 * float(expected_grad.abs().max()) + floor, name


@pytest.mark.parametrize("family", _families("refused"))
def test_refused_family_says_why(family):
    model = build_tiny(family)
    with pytest.raises(TypeError, match=FAMILIES[family].refused_match):
        route_with_moerouter(model)
    assert "_moerouter_state" not in model.__dict__


@pytest.mark.parametrize(
    "family", [name for name in _families("supported") if FAMILIES[name].adamoe]
)
def test_adamoe_conversion_keeps_the_top_k_outputs(family):
    # Null rows start as copies of real rows and ties go to the lower index (the real expert):
    # with as many null experts as real (m = E = 8) and twice the model's k (4), every token
    # picks its top-2 real experts and their copies, the copies weigh nothing. Renormalising
    # routers (most) are then unchanged; the others' weights become renormalised, so compare
    # with the renormalising top-k policy.
    import moerouter as mr

    reference = route_with_moerouter(
        build_tiny(family),
        lambda name, default: mr.TopK(default.num_experts, default.k, normalize=True),
    )
    converted = to_adamoe(copy.deepcopy(reference), num_null=8, k=4)
    ids = _tokens()
    with torch.no_grad():
        expected = _output(reference, ids)
        actual = _output(converted, ids)
    assert _relative_error(actual, expected) <= 1e-5


@pytest.mark.parametrize(
    "family", [name for name in _families("supported") if FAMILIES[name].no_adamoe]
)
def test_adamoe_refusal_says_why(family):
    with pytest.raises(ValueError, match="per-expert tensors"):
        to_adamoe(build_tiny(family), num_null=8, k=4)


def test_llama4_routes_only_the_chosen_experts_with_scaled_inputs():
    # Llama-4 multiplies each expert's input by its sigmoid score and runs every expert on every
    # token (zero input for the others); the routed block computes only the chosen rows.
    from moerouter_torch.integrations.transformers import remove_moerouter

    reference = build_tiny("llama4")
    routed = route_with_moerouter(copy.deepcopy(reference))
    blocks = routed.__dict__["_moerouter_state"].blocks.values()
    assert blocks and all(block.scaled_input and block.transposed for block in blocks)
    ids = _tokens()
    with torch.no_grad():
        expected = reference(ids, output_router_logits=True)
        actual = routed(ids, output_router_logits=True)
    # transformers records the router logits through the router's hooks: still there.
    assert len(actual.router_logits) == len(expected.router_logits) > 0
    for mine, theirs in zip(actual.router_logits, expected.router_logits, strict=True):
        assert _relative_error(mine, theirs) <= 1e-6
    generate = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(routed.generate(ids, **generate), reference.generate(ids, **generate))
    remove_moerouter(routed)
    with torch.no_grad():
        assert torch.equal(_output(routed, ids), _output(reference, ids))


def test_group_limited_routers_are_reproduced_as_group_limited():
    # On random probe rows a plain top-k often picks what the group-limited router picks; the
    # router's group attributes put the group-limited candidate first. DeepSeek-V2 names its
    # method: "group_limited_greedy" scores a group by its best expert ("max").
    import moerouter as mr

    reference = build_tiny("deepseek_v2", topk_method="group_limited_greedy")
    routed = route_with_moerouter(copy.deepcopy(reference))
    blocks = routed.__dict__["_moerouter_state"].blocks.values()
    for block in blocks:
        policy = block.default_policy
        assert isinstance(policy, mr.DeepSeekTopK), policy
        assert (policy.num_groups, policy.topk_groups, policy.group_score) == (4, 2, "max")
    ids = _tokens(batch=4, length=32)
    with torch.no_grad():
        assert _relative_error(_output(routed, ids), _output(reference, ids)) <= 1e-5
