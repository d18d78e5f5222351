"""moerouter_torch.integrations.transformers on tiny, randomly initialised models (no download).

Each model has 2 layers, hidden size 32 and 4 to 8 experts; the reference is the unmodified
model, in float32.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moerouter_torch.integrations.transformers import (  # noqa: E402
    from_adamoe,
    load_adamoe,
    remove_moerouter,
    route_with_moerouter,
    routing_statistics,
    save_adamoe,
    to_adamoe,
)

import moerouter as mr  # noqa: E402

VOCAB = 64
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _mixtral(**extra):
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **extra
        )
    )


def _qwen2_moe():
    return transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    )


def _qwen3_moe(norm_topk_prob: bool):
    return transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=norm_topk_prob,
            head_dim=8,
        )
    )


def _olmoe():
    return transformers.OlmoeForCausalLM(
        transformers.OlmoeConfig(
            **COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2
        )
    )


def _deepseek_v3(first_k_dense_replace: int = 0):
    model = transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            n_shared_experts=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            first_k_dense_replace=first_k_dense_replace,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
        )
    )
    # A trained model's correction bias is not zero: make it matter for the selection.
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.copy_(
                0.05 * torch.randn(module.e_score_correction_bias.shape, generator=generator)
            )
    return model


def _gpt_oss():
    return transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            **COMMON,
            intermediate_size=16,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"],
        )
    )


MODELS = {
    "mixtral": _mixtral,  # softmax top-k, renormalised
    "qwen2_moe": _qwen2_moe,  # no renormalising, shared expert behind a sigmoid gate
    "qwen3_moe_norm": lambda: _qwen3_moe(True),  # norm_topk_prob=True
    "qwen3_moe": lambda: _qwen3_moe(False),  # norm_topk_prob=False
    "olmoe": _olmoe,  # no renormalising
    "deepseek_v3": _deepseek_v3,  # sigmoid, 4 groups keep 2, bias, scaling, shared expert
    "deepseek_v3_dense_first": lambda: _deepseek_v3(1),  # first layer dense: one MoE block
    # Not named by the integration: found structurally (transposed, interleaved, biased experts,
    # a router with a bias and softmax after top-k).
    "gpt_oss": _gpt_oss,
}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().float().eval()


def _tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    scale = expected.abs().max().clamp(min=1e-30)
    return float((actual - expected).abs().max() / scale)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reproducing_policy_matches_the_original_model(name):
    reference = _build(name)
    routed = route_with_moerouter(copy.deepcopy(reference))
    ids = _tokens()
    expected = reference(ids, labels=ids)
    actual = routed(ids, labels=ids)
    assert _relative_error(actual.logits, expected.logits) <= 1e-5
    expected.loss.backward()
    actual.loss.backward()
    checked = 0
    for (param_name, param), (_, routed_param) in zip(
        reference.named_parameters(), routed.named_parameters(), strict=True
    ):
        if param.grad is None:
            assert routed_param.grad is None, param_name
            continue
        assert _relative_error(routed_param.grad, param.grad) <= 1e-5, param_name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mixtral", mr.TopK(num_experts=4, k=2, normalize=True)),
        ("qwen2_moe", mr.TopK(num_experts=8, k=2, normalize=False)),
        ("qwen3_moe_norm", mr.TopK(num_experts=8, k=2, normalize=True)),
        ("olmoe", mr.TopK(num_experts=8, k=2, normalize=False)),
        (
            "deepseek_v3",
            mr.DeepSeekTopK(8, 2, num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
        ),
    ],
)
def test_the_reproducing_policy_is_the_documented_one(name, expected):
    state = route_with_moerouter(_build(name)).__dict__["_moerouter_state"]
    assert {block.default_policy for block in state.blocks.values()} == {expected}


def test_router_logits_and_transformers_aux_loss_are_unchanged():
    reference = _build("mixtral")
    routed = route_with_moerouter(copy.deepcopy(reference))
    ids = _tokens()
    expected = reference(ids, labels=ids, output_router_logits=True)
    actual = routed(ids, labels=ids, output_router_logits=True)
    assert len(actual.router_logits) == len(expected.router_logits) == 2
    for mine, theirs in zip(actual.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(actual.aux_loss, expected.aux_loss)
    torch.testing.assert_close(actual.loss, expected.loss)


def test_routing_keeps_every_parameter_and_copies_follow_their_own_weights():
    reference = _build("qwen2_moe")
    before = {name: tensor.data_ptr() for name, tensor in reference.state_dict().items()}
    routed = route_with_moerouter(reference)
    after = {name: tensor.data_ptr() for name, tensor in routed.state_dict().items()}
    assert after == before  # same keys, same storage: no weight was copied or added
    clone = copy.deepcopy(routed)
    with torch.no_grad():
        clone.model.layers[0].mlp.experts.down_proj.zero_()
    ids = _tokens()
    assert _relative_error(clone(ids).logits, routed(ids).logits) > 1e-3
    remove_moerouter(clone)
    assert "forward" not in clone.model.layers[0].mlp.gate.__dict__


def test_a_policy_replaces_the_routing_and_remove_restores_it():
    reference = _build("mixtral")
    model = route_with_moerouter(copy.deepcopy(reference), mr.TopK(num_experts=4, k=1))
    ids = _tokens()
    with routing_statistics(model) as stats:
        changed = model(ids).logits
    assert stats.real_experts_per_token() == 1.0
    assert _relative_error(changed, reference(ids).logits) > 1e-3
    remove_moerouter(model)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_expert_choice_runs_through_the_token_slots():
    # An expert-layout routing reaches the experts as (T, E) slots.
    policy = mr.ExpertChoice(num_experts=8, capacity_factor=1.0)
    model = route_with_moerouter(_build("olmoe"), policy)
    ids = _tokens()
    with routing_statistics(model) as stats:
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    for row in stats.summary().values():
        assert sum(row["tokens_per_expert"]) == 8 * math.ceil(24 / 8)


def test_per_layer_statistics():
    model = route_with_moerouter(_build("qwen3_moe"), lambda name, default: default)
    with routing_statistics(model) as stats:
        model(_tokens(length=12))
        model(_tokens(length=4, seed=1))
    table = stats.summary()
    assert sorted(table) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for row in table.values():
        assert row["tokens"] == 2 * 12 + 2 * 4
        assert sum(row["tokens_per_expert"]) == 2 * row["tokens"]  # k = 2, nothing dropped
        assert row["real_experts_per_token"] == 2.0
        assert row["dropped_fraction"] == 0.0
    # Outside the with block nothing is recorded.
    model(_tokens())
    assert all(len(passes) == 2 for passes in stats.records.values())


def test_capacity_drops_are_reported():
    policy = mr.TopK(num_experts=8, k=2, capacity_factor=0.5)
    model = route_with_moerouter(_build("olmoe"), policy)
    with routing_statistics(model) as stats:
        model(_tokens())
    for row in stats.summary().values():
        assert row["dropped_fraction"] > 0
        assert max(row["tokens_per_expert"]) <= math.ceil(0.5 * 24 * 2 / 8)


@pytest.mark.parametrize(
    "name",
    [
        "mixtral",  # renormalising softmax router
        "qwen3_moe_norm",  # renormalising, norm_topk_prob=True
    ],
)
def test_adamoe_with_zero_null_experts_is_the_original_model(name):
    reference = _build(name)
    model = to_adamoe(copy.deepcopy(reference), num_null=0, k=2)
    ids = _tokens()
    expected = reference(ids, labels=ids)
    actual = model(ids, labels=ids, output_router_logits=False)
    assert _relative_error(actual.logits, expected.logits) <= 1e-5
    torch.testing.assert_close(actual.loss, expected.loss)


def test_adamoe_null_rows_are_tiled_and_survive_a_state_dict_round_trip():
    model = to_adamoe(_build("mixtral"), num_null=6, k=4)
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.shape == (10, 32)
    torch.testing.assert_close(gate[4:8], gate[:4])  # null row j starts as real row j mod 4
    torch.testing.assert_close(gate[8:], gate[:2])
    with torch.no_grad():
        gate[4:].add_(1.0)  # as if fine-tuned
    state = copy.deepcopy(model.state_dict())

    restored = to_adamoe(_build("mixtral"), num_null=6, k=4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.model.layers[0].mlp.gate.weight, gate)
    ids = _tokens()
    torch.testing.assert_close(restored(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_adamoe_loss_replaces_the_aux_loss_and_from_adamoe_goes_back():
    reference = _build("mixtral")
    model = to_adamoe(copy.deepcopy(reference), num_null=4, k=3)
    ids = _tokens()
    out = model(ids, labels=ids)  # to_adamoe turned config.output_router_logits on
    assert [tuple(logits.shape) for logits in out.router_logits] == [(24, 8), (24, 8)]
    layers = model.__dict__["_moerouter_state"].blocks.values()
    pairs = zip(layers, out.router_logits, strict=True)
    routings = [block.policy(logits) for block, logits in pairs]
    expected = torch.stack([mr.losses.null_load_balancing(r) for r in routings]).mean()
    torch.testing.assert_close(out.aux_loss, expected)
    plain = model(ids, labels=ids, output_router_logits=False)
    torch.testing.assert_close(out.loss, plain.loss + 0.001 * expected)

    from_adamoe(model)
    assert model.model.layers[0].mlp.gate.weight.shape == (4, 32)
    assert model.config.output_router_logits is False
    expected_out = reference(ids, labels=ids, output_router_logits=True)
    back = model(ids, labels=ids, output_router_logits=True)
    assert _relative_error(back.logits, expected_out.logits) <= 1e-5
    torch.testing.assert_close(back.aux_loss, expected_out.aux_loss)


def test_adamoe_fine_tuning_lowers_the_loss_and_changes_experts_per_token():
    torch.manual_seed(0)
    model = to_adamoe(_mixtral().float(), num_null=8, k=4, aux_loss_coef=0.1)
    model.train()
    ids = _tokens(batch=4, length=16)
    with torch.no_grad(), routing_statistics(model) as before:
        first = model(ids, labels=ids).loss
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    with torch.no_grad(), routing_statistics(model) as after:
        last = model(ids, labels=ids).loss
    assert float(last) < float(first)
    assert after.real_experts_per_token() != before.real_experts_per_token()
    null_fractions = [row["null_fraction"] for row in after.summary().values()]
    assert all(0 < fraction < 1 for fraction in null_fractions)


@pytest.mark.parametrize(
    ("num_null", "k", "fewest", "most"),
    [
        (4, 3, 2, 2),  # E = 4 divides m = 4: ceil(k / (1 + m / E)) = 2 with exact ties
        (2, 3, 2, 3),  # experts 0 and 1 have a copy, 2 and 3 none: 2 or 3, not always 2
    ],
)
def test_real_experts_right_after_the_conversion(num_null, k, fewest, most):
    # docs/integrations/transformers.rst: ceil(k / (1 + m / E)) only when E divides m, else a
    # range [n_min, n_max] (tests/methods/test_adamoe_tiling.py checks its formula on a sweep with
    # exact ties). The router's float32 matmul can round a copy one ulp above its original:
    # a token may then reach one real expert fewer than n_min.
    model = to_adamoe(_build("mixtral"), num_null=num_null, k=k)
    with torch.no_grad(), routing_statistics(model) as stats:
        model(_tokens(batch=4, length=16))
    for passes in stats.records.values():
        histogram = passes[0][1]["real_experts_histogram"]
        seen = set(torch.nonzero(histogram).flatten().tolist())
        assert seen <= set(range(fewest - 1, most + 1)), seen
        assert {fewest, most} <= seen


def test_null_choices_cost_no_expert_rows(monkeypatch):
    from moerouter_torch import _grouped

    seen = []

    def counting(rows, weight):
        seen.append(rows.shape[0])
        return rows @ weight

    monkeypatch.setattr(_grouped, "_expert_matmul", counting)
    model = to_adamoe(_build("mixtral"), num_null=8, k=4)
    ids = _tokens()
    with torch.no_grad(), routing_statistics(model) as stats:
        model(ids)
    real_rows = sum(sum(row["tokens_per_expert"]) for row in stats.summary().values())
    assert real_rows < 2 * 24 * 4  # some of the 4 choices of each token went to null experts
    assert sum(seen) == 2 * real_rows  # both expert matmuls of each layer: real rows only


def test_null_gate_rows_get_gradient_only_from_the_balancing_loss():
    model = to_adamoe(_build("mixtral"), num_null=4, k=3)
    ids = _tokens()
    model(ids, labels=ids, output_router_logits=False).loss.backward()
    gate = model.model.layers[1].mlp.gate.weight
    assert gate.grad[:4].abs().max() > 0
    assert gate.grad[4:].abs().max() == 0  # the task loss cannot reach null logits
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert gate.grad[4:].abs().max() > 0


def test_deepseek_v3_reads_the_correction_bias_on_every_call():
    # Auxiliary-loss-free balancing updates the bias buffer during training: the routed model
    # must follow the new bias, not the one seen when it was routed.
    reference = _build("deepseek_v3")
    routed = route_with_moerouter(copy.deepcopy(reference))
    generator = torch.Generator().manual_seed(2)
    for model in (reference, routed):
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(
                    0.2 * torch.randn(module.e_score_correction_bias.shape, generator=generator)
                )
        generator.manual_seed(2)
    ids = _tokens()
    assert _relative_error(routed(ids).logits, reference(ids).logits) <= 1e-5


def _flint():
    return transformers.FlintForCausalLM(
        transformers.FlintConfig(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[],
        )
    )


def _mistral4():
    return transformers.Mistral4ForCausalLM(
        transformers.Mistral4Config(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.0,
            norm_topk_prob=True,
            n_shared_experts=1,
        )
    )


def _openai_privacy_filter():
    return transformers.OpenAIPrivacyFilterForTokenClassification(
        transformers.OpenAIPrivacyFilterConfig(
            **COMMON,
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


# Routers no attribute names, reproduced by existing policies (issue 23): the probe finds them.
PROBED = {
    # sigmoid scores without bias, renormalised top-k
    "flint": (_flint, mr.TopK(8, 2, score="sigmoid")),
    # softmax scores, 4 groups keep 2 (top-2 sums), no bias, renormalised, scaled by 2
    "mistral4": (
        _mistral4,
        mr.DeepSeekTopK(
            8, 2, num_groups=4, topk_groups=2, score="softmax", routed_scaling_factor=2.0
        ),
    ),
    # a softmax over the chosen logits, divided by k
    "openai_privacy_filter": (
        _openai_privacy_filter,
        mr.DeepSeekTopK(4, 2, score="softmax", routed_scaling_factor=0.5),
    ),
}


def _weighted_sum(output: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, output.numel()).reshape(output.shape)
    return (output * weights).sum()


@pytest.mark.parametrize("name", sorted(PROBED))
def test_probed_routers_are_reproduced(name):
    build, expected_policy = PROBED[name]
    torch.manual_seed(0)
    reference = build().float().eval()
    routed = route_with_moerouter(copy.deepcopy(reference))
    state = routed.__dict__["_moerouter_state"]
    assert {block.default_policy for block in state.blocks.values()} == {expected_policy}
    ids = _tokens()
    expected, actual = reference(ids).logits, routed(ids).logits
    assert _relative_error(actual, expected) <= 1e-5
    _weighted_sum(expected).backward()
    _weighted_sum(actual).backward()
    for (param_name, param), (_, routed_param) in zip(
        reference.named_parameters(), routed.named_parameters(), strict=True
    ):
        if param.grad is not None:
            assert _relative_error(routed_param.grad, param.grad) <= 1e-5, param_name


class _ScaledSigmoidRouter(torch.nn.Module):
    """A router no built-in candidate reproduces: renormalised sigmoid top-k, times 3."""

    def __init__(self, weight: torch.Tensor, top_k: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.top_k = top_k

    def forward(self, hidden_states):
        logits = torch.nn.functional.linear(
            hidden_states.reshape(-1, self.weight.shape[1]), self.weight
        )
        scores, index = torch.topk(logits.sigmoid(), self.top_k, dim=-1)
        return logits, 3.0 * scores / scores.sum(dim=-1, keepdim=True), index


def _scaled_sigmoid_mixtral():
    model = _build("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate = _ScaledSigmoidRouter(layer.mlp.gate.weight, 2)
    return model


def test_a_given_policy_that_reproduces_an_unknown_router_is_used():
    reference = _scaled_sigmoid_mixtral()
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        route_with_moerouter(copy.deepcopy(reference))  # nothing to go by
    policy = mr.DeepSeekTopK(4, 2, routed_scaling_factor=3.0)
    routed = route_with_moerouter(copy.deepcopy(reference), policy)
    state = routed.__dict__["_moerouter_state"]
    assert {block.default_policy for block in state.blocks.values()} == {policy}
    ids = _tokens()
    assert _relative_error(routed(ids).logits, reference(ids).logits) <= 1e-5


def test_a_given_policy_that_does_not_reproduce_an_unknown_router_is_refused():
    with pytest.raises(TypeError, match="the given policy does not reproduce it either"):
        route_with_moerouter(_scaled_sigmoid_mixtral(), mr.TopK(4, 2, score="sigmoid"))


def test_a_given_policy_on_a_probed_router():
    # Before issue 23 an explicit policy did not help a block the probe could not identify.
    torch.manual_seed(0)
    model = route_with_moerouter(_flint().float().eval(), mr.TopK(8, 1, score="sigmoid"))
    with routing_statistics(model) as stats:
        model(_tokens())
    assert stats.real_experts_per_token() == 1.0


def _hy_v3():
    return transformers.HYV3ForCausalLM(
        transformers.HYV3Config(
            **COMMON,
            intermediate_size=24,
            moe_intermediate_size=16,
            num_local_experts=8,
            num_experts=8,
            num_experts_per_tok=2,
        )
    )


def _minimax_m2():
    return transformers.MiniMaxM2ForCausalLM(
        transformers.MiniMaxM2Config(
            **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2
        )
    )


@pytest.mark.parametrize("build", [_hy_v3, _minimax_m2], ids=["hy_v3", "minimax_m2"])
def test_router_taking_the_correction_bias_per_call_follows_it(build):
    # These routers take the block's e_score_correction_bias as a forward argument (they used to
    # be refused): the routed forward passes it on to DeepSeekTopK on every call, so a bias
    # updated after routing (auxiliary-loss-free balancing) is followed.
    torch.manual_seed(0)
    reference = build().float().eval()
    routed = route_with_moerouter(copy.deepcopy(reference))
    generator = torch.Generator().manual_seed(3)
    for model in (reference, routed):
        for module in model.modules():
            if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
                module.e_score_correction_bias.copy_(
                    0.2 * torch.randn(module.e_score_correction_bias.shape, generator=generator)
                )
            if hasattr(module, "gate") and hasattr(module.gate, "weight"):
                module.gate.weight.data.normal_(0, 0.5, generator=generator)
        generator.manual_seed(3)
    ids = _tokens()
    assert _relative_error(routed(ids).logits, reference(ids).logits) <= 1e-5


def test_unsupported_block_names_its_class():
    torch.manual_seed(0)
    model = transformers.PhimoeForCausalLM(
        transformers.PhimoeConfig(
            **COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2
        )
    )
    with pytest.raises(TypeError, match="PhimoeSparseMoeBlock"):
        route_with_moerouter(model)


def test_model_without_moe_blocks_is_rejected():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=16))
    with pytest.raises(TypeError, match="LlamaForCausalLM has no MoE block"):
        route_with_moerouter(model)


def test_wrong_policy_and_adamoe_on_deepseek_are_rejected():
    model = _build("mixtral")
    with pytest.raises(ValueError, match="MixtralSparseMoeBlock"):
        route_with_moerouter(model, mr.TopK(num_experts=8, k=2))
    with pytest.raises(ValueError, match="to_adamoe"):
        route_with_moerouter(model, mr.NullExperts(num_experts=4, num_null=2, k=2))
    with pytest.raises(ValueError, match="DeepseekV3MoE"):
        to_adamoe(_build("deepseek_v3"), num_null=4, k=2)
    with pytest.raises(ValueError, match="call route_with_moerouter"):
        with routing_statistics(_build("olmoe")):
            pass


def test_save_and_load_adamoe_keeps_the_null_rows(tmp_path):
    model = to_adamoe(_build("mixtral"), num_null=6, k=4)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight[4:].add_(1.0)  # as if fine-tuned
    save_adamoe(model, str(tmp_path))
    assert model.config.output_router_logits is True  # restored after saving
    loaded = load_adamoe(transformers.MixtralForCausalLM, str(tmp_path))
    gate = loaded.model.layers[0].mlp.gate.weight
    assert gate.shape == (10, 32)
    torch.testing.assert_close(gate, model.model.layers[0].mlp.gate.weight)
    ids = _tokens()
    expected, actual = model(ids, labels=ids), loaded(ids, labels=ids)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.aux_loss, expected.aux_loss)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe_norm", "deepseek_v3", "olmoe"])
def test_greedy_generate_is_identical(name):
    # The major lines of benchmarks/bench_transformers.py: the routed model decodes the same
    # tokens (prefill and the cached one-token steps both go through moerouter).
    reference = _build(name)
    routed = route_with_moerouter(copy.deepcopy(reference))
    prompt = _tokens(length=6)
    with torch.no_grad():
        expected = reference.generate(prompt, max_new_tokens=6, do_sample=False)
        actual = routed.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)
