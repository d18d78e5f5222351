"""Route a pretrained Hugging Face ``transformers`` MoE model through moerouter, in one call.

transformers 5 builds every sparse MoE block from two modules: a router (``block.gate`` or
``block.router``) whose forward returns ``(router_logits, top_k_weights, top_k_index)``, and an
experts module (``block.experts``) holding all experts' weights as 3-D parameters and called as
``experts(hidden_states, top_k_index, top_k_weights)``. :func:`route_with_moerouter` replaces
those two forwards on each block instance, and nothing else:

- the router still computes its logits with its own code (so their dtype and any float32
  up-cast are the model's), then a moerouter policy turns them into a :class:`moerouter.Routing`;
- the experts run :func:`moerouter.make_plan`, :func:`moerouter.dispatch`, a grouped matrix
  product on the block's own expert parameters (views, never copies; only the rows that reach
  an expert are multiplied) and :func:`moerouter.combine`;
- the block's own forward (jitter noise, shared experts and their gates, reshapes) is untouched,
  so are the hooks transformers uses to return ``router_logits`` and compute its auxiliary loss.

By default each block gets the policy that reproduces its original routing, found from the
router's attributes and checked on a probe input: softmax or sigmoid top-k with or without
renormalising (Mixtral, Qwen2-MoE and Qwen3-MoE with ``norm_topk_prob``, OLMoE, gpt-oss,
Flint, any other router of that form), DeepSeek-V3's sigmoid, group-limited selection with
correction bias and scaling (:class:`moerouter.DeepSeekTopK`, given the router's
``e_score_correction_bias`` on every call), group-limited routing without a bias (Mistral 4) or
a softmax over the chosen logits scaled by 1/k (OpenAI privacy filter). Llama-4's block, which
scales each expert's input (not its output) by a sigmoid top-k score and runs every expert
densely, gets its own forward replaced too: only the chosen rows are computed. A policy given to
:func:`route_with_moerouter` is checked on the probe as well. A router none of these reproduces,
or whose forward needs more than the hidden states (HY-V3, MiniMax-M2: a per-call bias), raises
``TypeError`` naming the block class.

:func:`to_adamoe` turns the model into AdaMoE (null experts, Zeng et al. 2024) and
:func:`from_adamoe` back; :func:`routing_statistics` collects :func:`moerouter.stats.summary`
per layer from forward passes.

**Size.** Over 1000 lines, kept as one module: every public function here works through the one
piece of state :func:`route_with_moerouter` attaches to the model (``_Model``, its ``_Block``
entries and the forwards it patched). Removing the routing, converting to and from AdaMoE,
saving and loading it and collecting statistics all find that state and restore or re-patch the
same forwards, so a reader following a patched forward back to where it was installed and
where it is undone stays in one file. What varies per model family is a table of its own
(:mod:`moerouter_torch.integrations.transformers_families`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

import moerouter as mr
from moerouter_torch._grouped import grouped_mm

__all__ = [
    "RoutingStats",
    "from_adamoe",
    "load_adamoe",
    "remove_moerouter",
    "route_with_moerouter",
    "routing_statistics",
    "save_adamoe",
    "to_adamoe",
]

_ADAMOE_FILE = "moerouter_adamoe.json"
_ROUTERS_FILE = "moerouter_adamoe_routers.safetensors"

_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_expert_gate", "shared_experts", "shared_mlp")
# the factor routers multiply their weights by: DeepSeek-V3 and most, HY-V3, AFMoE
_SCALE_NAMES = ("routed_scaling_factor", "router_scaling_factor", "route_scale")
_STATE = "_moerouter_state"
_PROBE_TOKENS = 512


class RoutingStats:
    """Per-layer routing statistics gathered by :func:`routing_statistics`.

    ``records[name]`` lists, for every forward pass of the MoE block ``name``, the number of
    tokens and :func:`moerouter.stats.summary` of its routing (detached tensors).
    """

    def __init__(self, on_routing: Callable[[str, Any, torch.Tensor], None] | None = None) -> None:
        self.records: dict[str, list[tuple[int, dict[str, torch.Tensor]]]] = {}
        self._on_routing = on_routing

    def _add(self, name: str, routing: Any, logits: torch.Tensor) -> None:
        with torch.no_grad():
            summary = {key: value.detach() for key, value in mr.stats.summary(routing).items()}
        self.records.setdefault(name, []).append((int(routing.num_tokens), summary))
        if self._on_routing is not None:
            self._on_routing(name, routing, logits)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Every layer's statistics over all recorded passes, as Python numbers.

        Per layer: ``tokens``; ``tokens_per_expert`` (list, summed over passes);
        ``real_experts_per_token``, ``dropped_fraction``, ``null_fraction`` and
        ``router_entropy`` (token-weighted means over passes); ``load_cv`` and
        ``load_max_over_mean`` of the summed ``tokens_per_expert``.
        """
        table: dict[str, dict[str, Any]] = {}
        for name, passes in self.records.items():
            tokens = sum(count for count, _ in passes)
            load = sum(stats["tokens_per_expert"].double().cpu() for _, stats in passes)
            assert isinstance(load, torch.Tensor)
            mean_load = max(float(load.mean()), 1e-30)
            row: dict[str, Any] = {
                "tokens": tokens,
                "tokens_per_expert": [int(value) for value in load.tolist()],
                "load_cv": float(load.std(unbiased=False)) / mean_load,
                "load_max_over_mean": float(load.max()) / mean_load,
            }
            for key in ("real_experts_per_token", "dropped_fraction", "null_fraction"):
                row[key] = sum(count * float(stats[key]) for count, stats in passes) / tokens
            row["router_entropy"] = (
                sum(count * float(stats["router_entropy"]) for count, stats in passes) / tokens
            )
            table[name] = row
        return table

    def real_experts_per_token(self) -> float:
        """Mean over layers of the real experts a token reaches (expert FLOPs scale with it)."""
        rows = self.summary().values()
        return sum(row["real_experts_per_token"] for row in rows) / max(len(rows), 1)


@dataclass
class _AdaMoE:
    num_null: int
    k: int
    null_mode: str
    convention: str
    aux_loss_coef: float | None
    output_router_logits_before: Any
    hooks: list[Any]
    wants_loss: bool = False
    records: list[Any] | None = None


@dataclass
class _Block:
    """One routed MoE block: its modules, the reproducing policy and the policy in use."""

    name: str
    block: nn.Module = field(repr=False)
    router: nn.Module = field(repr=False)
    linear: nn.Module = field(repr=False)  # holds the router's weight (the router or a child)
    experts: nn.Module = field(repr=False)
    num_experts: int
    default_policy: Any
    policy: Any
    model: _Model = field(repr=False)
    transposed: bool = False  # expert weights stored (experts, in, out)
    # Llama-4's form: the router returns dense scores and the block multiplies each expert's
    # input (not its output) by the token's score; its experts take no routing arguments.
    scaled_input: bool = False


@dataclass
class _Model:
    blocks: dict[str, _Block] = field(default_factory=dict)
    stats: list[RoutingStats] = field(default_factory=list)
    adamoe: _AdaMoE | None = None
    # (module, attribute, what it held before): undone by remove_moerouter
    patches: list[tuple[nn.Module, str, Any]] = field(default_factory=list, repr=False)

    def record(self, block: _Block, logits: torch.Tensor, routing: Any) -> None:
        for collector in self.stats:
            collector._add(block.name, routing, logits)
        adamoe = self.adamoe
        if adamoe is not None and adamoe.records is not None:
            adamoe.records.append((logits, routing))


# --------------------------------------------------------------------------------------------
# Finding and checking the MoE blocks


def _router_of(block: nn.Module) -> nn.Module | None:
    for name in _ROUTER_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _router_linear(router: nn.Module) -> nn.Module | None:
    """The module holding the router's (experts, hidden) weight: the router, or its one linear.

    Most routers hold ``weight`` themselves; HunYuan-MoE (``wg``), AFMoE (``gate``) and DBRX
    (``layer``) wrap one ``nn.Linear``.
    """
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return router
    linears = [child for child in router.children() if isinstance(child, nn.Linear)]
    others = [child for child in router.children() if not isinstance(child, nn.Linear)]
    if len(linears) == 1 and not any(any(True for _ in other.parameters()) for other in others):
        return linears[0]
    return None


def _candidate_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules with an ``experts`` child: every MoE block, supported or not."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "experts", None), nn.Module):
            yield name, module


def _unsupported(block: nn.Module, name: str, why: str) -> TypeError:
    return TypeError(
        f"cannot route {type(block).__name__} (module {name!r}) through moerouter: {why}"
    )


def _check_experts(block: nn.Module, name: str, experts: nn.Module) -> tuple[int, bool]:
    """Validate the fused 3-D expert layout; return the number of experts and whether the
    weights are stored (experts, in, out) ("transposed")."""
    if getattr(experts, "_is_expert_parallel", False):
        raise _unsupported(block, name, "expert-parallel experts are not supported")
    has_gate = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
    up = getattr(experts, "gate_up_proj" if has_gate else "up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        raise _unsupported(
            block,
            name,
            f"its experts module {type(experts).__name__} does not hold fused 3-D "
            "'gate_up_proj'/'up_proj' and 'down_proj' parameters",
        )
    if up.ndim != 3 or down.ndim != 3 or up.shape[0] != down.shape[0]:
        raise _unsupported(block, name, "its expert parameters are not (experts, ., .) tensors")
    transposed = _expert_layout(experts, up, down, has_gate)
    if transposed is None:
        raise _unsupported(
            block,
            name,
            f"its expert parameters {tuple(up.shape)} and {tuple(down.shape)} do not map a "
            "width to itself in either layout, (experts, out, in) or (experts, in, out)",
        )
    if has_gate and not (hasattr(experts, "_apply_gate") or hasattr(experts, "act_fn")):
        raise _unsupported(block, name, "its experts have no gating function")
    return int(up.shape[0]), transposed


def _expert_layout(
    experts: nn.Module, up: torch.Tensor, down: torch.Tensor, has_gate: bool
) -> bool | None:
    """True for (experts, in, out) weights, False for (experts, out, in), None for neither.

    transformers' ``is_transposed`` flag says it when present; otherwise (Llama-4's
    (experts, hidden, 2 * intermediate) experts) the layout in which the experts map a width to
    itself, through an intermediate width halved by the gate, is the one. Their width may differ
    from the router's: MuseSpark projects the hidden states before its experts.
    """

    def fits(transposed: bool) -> bool:
        up_in, up_out = (up.shape[1], up.shape[2]) if transposed else (up.shape[2], up.shape[1])
        down_in, down_out = (
            (down.shape[1], down.shape[2]) if transposed else (down.shape[2], down.shape[1])
        )
        return up_in == down_out and up_out == down_in * (2 if has_gate else 1)

    flag = getattr(experts, "is_transposed", None)
    if isinstance(flag, bool):
        return flag if fits(flag) else None
    if fits(False):
        return False
    return True if fits(True) else None


def _candidates(
    router: nn.Module, num_experts: int, k: int, bias_per_call: bool = False
) -> list[Any]:
    """Policies that may reproduce ``router``, most likely first (read from its attributes).

    The probe keeps the first that gives the router's own choices and weights: DeepSeek-V3's
    biased group-limited sigmoid; softmax or sigmoid top-k, renormalised or not (Mixtral,
    Qwen, OLMoE, gpt-oss; Flint); group-limited routing without a bias (Mistral 4: softmax,
    groups, scaling); a softmax over the chosen logits scaled by 1 / k (OpenAI privacy filter).
    """
    renormalise = getattr(router, "norm_topk_prob", None)
    order = [True, False] if renormalise is None or renormalise else [False, True]
    groups = getattr(router, "num_group", getattr(router, "n_group", None))
    num_groups = int(groups) if groups and num_experts % int(groups) == 0 else 1
    topk_groups = min(int(getattr(router, "topk_group", 1) or 1), num_groups)
    scale = next(
        (getattr(router, key) for key in _SCALE_NAMES if getattr(router, key, None) is not None),
        1.0,
    )
    scaling = float(scale or 1.0)
    # DeepSeek-V2 names its method: "greedy" ignores the groups, "group_limited_greedy" scores
    # a group by its best expert.
    method = getattr(router, "topk_method", None)
    if method == "greedy":
        num_groups, topk_groups = 1, 1
    grouped: dict[str, Any] = {"num_groups": num_groups, "topk_groups": topk_groups}
    if method == "group_limited_greedy":
        grouped["group_score"] = "max"
    candidates: list[Any] = []
    if bias_per_call or isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor):
        candidates.append(
            _deepseek(num_experts, k, normalize=order[0], routed_scaling_factor=scaling, **grouped)
        )
    plain = [
        mr.TopK(num_experts, k, score=score, normalize=flag)
        for score in ("softmax", "sigmoid")
        for flag in order
    ]
    limited = [
        _deepseek(
            num_experts, k, score=score, normalize=flag, routed_scaling_factor=factor, **grouped
        )
        for score in ("softmax", "sigmoid")
        for factor in dict.fromkeys((1.0, scaling))
        for flag in order
    ]
    # A router whose attributes say groups limit the choice is tried as such first: on random
    # probe rows the plain top-k often agrees with it, and then differs on real inputs.
    if num_groups > 1 and topk_groups < num_groups:
        candidates += limited + plain
    else:
        candidates += plain + (limited if num_groups > 1 else [])
    candidates.append(_deepseek(num_experts, k, score="softmax", routed_scaling_factor=1.0 / k))
    return [candidate for candidate in candidates if candidate is not None]


def _deepseek(num_experts: int, k: int, **options: Any) -> mr.DeepSeekTopK | None:
    """A DeepSeekTopK, or None where the router's attributes make an invalid one."""
    try:
        return mr.DeepSeekTopK(num_experts=num_experts, k=k, **options)
    except ValueError:
        return None


def _run_policy(
    policy: Any, logits: torch.Tensor, router: nn.Module, bias: torch.Tensor | None = None
) -> Any:
    """Run ``policy``; a DeepSeekTopK gets the bias passed to the router's forward, if any,
    else the router's ``e_score_correction_bias``."""
    if isinstance(policy, mr.DeepSeekTopK):
        # The bias is a buffer the model may update between calls: read it every time.
        if bias is None:
            bias = getattr(router, "e_score_correction_bias", None)
        return policy(logits, bias)
    return policy(logits)


def _token_slots(routing: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A routing as the (T, F) ``top_k_index`` (int64, -1 = none) and ``top_k_weights``.

    Token layout: ``F = k``. Expert layout (expert choice): ``F = E``, slot ``e`` of a token
    holds expert ``e`` when that expert took the token.
    """
    tokens = routing.num_tokens
    if routing.layout == "token":
        shape = (tokens, routing.slots)
        return routing.expert_ids.reshape(shape).long(), routing.weights.reshape(shape)
    experts = routing.num_experts
    valid = routing.expert_ids >= 0
    spill = tokens * experts  # one extra slot collects the assignments that go nowhere
    position = torch.where(
        valid, routing.token_ids.long() * experts + routing.expert_ids.long(), spill
    )
    index = torch.full((spill + 1,), -1, dtype=torch.long, device=position.device)
    index = index.scatter(0, position, routing.expert_ids.long())
    weights = routing.weights.new_zeros(spill + 1).index_put((position,), routing.weights)
    return index[:spill].reshape(tokens, experts), weights[:spill].reshape(tokens, experts)


def _probe(
    router: nn.Module,
    candidates: list[Any],
    hidden_size: int,
    extra: tuple[torch.Tensor, ...] = (),
    k: int | None = None,
) -> Any | None:
    """The first candidate policy that gives the router's own choices and weights on a probe.

    Rows whose logits are all equal (an uninitialised router) say nothing and are skipped; if
    every row is such, the first candidate (read from the router's attributes) is trusted.
    ``extra`` holds the block's tensors the router's forward takes after the hidden states (a
    per-call correction bias); its first is the bias a DeepSeekTopK candidate gets. A router
    returning ``(scores, logits)`` with dense (tokens, experts) scores, zero where not chosen
    (Llama-4), is read as its ``k`` largest scores.
    """
    linear = _router_linear(router)
    if not candidates or linear is None:
        return None
    weight = linear.weight
    with torch.no_grad():
        outputs = _router_outputs(router, hidden_size, extra)
        if outputs is None:
            return None
        if _dense_scores(outputs) and k is not None:
            logits = outputs[1]
            their_weights, their_index = outputs[0].topk(k, dim=-1)
        elif isinstance(outputs, tuple) and len(outputs) >= 3:
            logits, their_weights, their_index = outputs[0], outputs[1], outputs[2]
        else:
            return None
        if their_index.ndim != 2 or their_weights.shape != their_index.shape:
            return None
        informative = (logits.amax(dim=-1) - logits.amin(dim=-1)) > 0
        if not bool(informative.any()):
            return candidates[0]
        their_index, order = their_index.sort(dim=-1)
        their_weights = their_weights.float().gather(1, order)
        tolerance = 1e-5 if weight.dtype in (torch.float32, torch.float64) else 2e-2
        for candidate in candidates:
            try:
                bias = extra[0] if extra else None
                index, weights = _token_slots(_run_policy(candidate, logits, router, bias))
            except (TypeError, ValueError):
                continue
            if index.shape != their_index.shape:
                continue
            index, order = index.sort(dim=-1)
            weights = weights.gather(1, order)
            same_index = (index == their_index).all(dim=-1)
            close = torch.isclose(weights, their_weights, rtol=tolerance, atol=tolerance).all(-1)
            agree = (same_index & close) | ~informative
            # Low precision can tie two logits; let a few rows disagree there.
            needed = 1.0 if tolerance < 1e-3 else 0.9
            if float(agree.float().mean()) >= needed:
                return candidate
    return None


def _router_outputs(
    router: nn.Module, hidden_size: int, extra: tuple[torch.Tensor, ...] = ()
) -> Any:
    """The router's own forward on the probe input (None if it needs more arguments)."""
    linear = _router_linear(router)
    assert linear is not None
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(_PROBE_TOKENS, hidden_size, generator=generator)
    probe = probe.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        try:
            return type(router).forward(router, probe, *extra)
        except TypeError:  # a forward that needs more than the hidden states
            return None
        except (ValueError, RuntimeError):
            # A router that unpacks (batch, sequence, hidden) states (AFMoE) gets them.
            return type(router).forward(router, probe[None], *extra)


def _dense_scores(outputs: Any) -> bool:
    """A router output of the Llama-4 form: ``(scores, logits)``, both (tokens, experts)."""
    return (
        isinstance(outputs, tuple)
        and len(outputs) == 2
        and all(isinstance(item, torch.Tensor) and item.ndim == 2 for item in outputs)
        and outputs[0].shape == outputs[1].shape
    )


def _takes_routing(experts: nn.Module) -> bool:
    """Whether the experts' forward takes the routing (``top_k_index``, ``top_k_weights``);
    Llama-4's takes only the hidden states, already scaled by the router's scores."""
    try:
        parameters = list(inspect.signature(type(experts).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return True
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return len(parameters) >= 3 or any(parameter.kind in variadic for parameter in parameters)


def _extra_forward_arguments(router: nn.Module, block: nn.Module) -> list[str]:
    """Arguments of the router's forward besides the hidden states that the block passes: the
    required ones, and optional ones named after a tensor the block holds (LFM2-MoE's
    ``expert_bias=None``, given by the block when it uses one)."""
    try:
        signature = inspect.signature(type(router).forward)
    except (TypeError, ValueError):
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = [p for p in list(signature.parameters.values())[2:] if p.kind in positional]
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty]
    held = [
        p.name
        for p in parameters
        if p.default is None and isinstance(getattr(block, p.name, None), torch.Tensor)
    ]
    return required or held[:1]


def _per_call_bias(
    block: nn.Module, name: str, router: nn.Module, num_experts: int
) -> tuple[torch.Tensor, ...]:
    """The block's tensors its router's forward takes after the hidden states, for the probe.

    HY-V3 and MiniMax-M2 pass the block's ``e_score_correction_bias``, AFMoE its
    ``expert_bias``: a selection-only bias of one entry per expert, which the routed forward
    hands to the policy as :class:`moerouter.DeepSeekTopK`'s ``bias``. Anything else (DeepSeek-V4's
    hash router takes the ``input_ids``) is refused.
    """
    names = _extra_forward_arguments(router, block)
    if not names:
        return ()
    value = getattr(block, names[0], None)
    if (
        len(names) != 1
        or not isinstance(value, torch.Tensor)
        or value.ndim != 1
        or value.shape[0] != num_experts
    ):
        raise _unsupported(
            block,
            name,
            f"its router {type(router).__name__}.forward takes {', '.join(map(repr, names))} "
            "besides the hidden states, and that is not a per-expert bias held by the block "
            "(moerouter passes a policy only the logits and such a bias)",
        )
    return (value,)


def _reproducing_policy(
    block: nn.Module, name: str, router: nn.Module, num_experts: int, given: Any = None
) -> Any:
    """The policy that reproduces the block's router, checked on a probe input.

    The probe tries the built-in candidates, then ``given`` (a policy passed to
    :func:`route_with_moerouter`): a router none of them reproduces is refused.
    """
    extra = _per_call_bias(block, name, router, num_experts)
    k = getattr(router, "top_k", getattr(block, "top_k", None))
    if not isinstance(k, int):
        raise _unsupported(block, name, f"its router {type(router).__name__} has no int top_k")
    linear = _router_linear(router)
    assert linear is not None  # route_with_moerouter checked it
    hidden_size = int(linear.weight.shape[1])
    candidates = _candidates(router, num_experts, k, bias_per_call=bool(extra))
    policy = _probe(router, candidates, hidden_size, extra, k)
    if policy is None and given is not None:
        policy = _probe(router, [given], hidden_size, extra, k)
    if policy is None:
        raise _unsupported(
            block,
            name,
            f"moerouter could not reproduce the choices of its router {type(router).__name__} "
            "on a probe input: it is not a softmax or sigmoid top-k router (with or without "
            "renormalising), a group-limited router (DeepSeek-V3's biased sigmoid, or without "
            "a bias) or a softmax over the chosen logits scaled by 1/k"
            + ("; the given policy does not reproduce it either" if given is not None else ""),
        )
    return policy


def _policy_columns(policy: Any) -> int:
    return int(policy.num_experts) + int(getattr(policy, "num_null", 0))


# --------------------------------------------------------------------------------------------
# The two replaced forwards


def _routed_router_forward(
    block: _Block, hidden_states: torch.Tensor, *bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The router's own code computes the logits (dtype, float32 up-cast and bias as the model
    # does); its own top-k is recomputed below by the policy. ``bias``: the per-call
    # correction bias some blocks pass (HY-V3, MiniMax-M2, AFMoE).
    logits = type(block.router).forward(block.router, hidden_states, *bias)[0]
    routing = _run_policy(block.policy, logits, block.router, bias[0] if bias else None)
    block.model.record(block, logits, routing)
    index, weights = _token_slots(routing)
    return logits, weights, index


def _routed_dense_router_forward(
    block: _Block, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    # Llama-4's router form: (dense scores, logits); the routing rides along for the block.
    logits = type(block.router).forward(block.router, hidden_states)[1]
    routing = _run_policy(block.policy, logits, block.router)
    block.model.record(block, logits, routing)
    index, weights = _token_slots(routing)
    valid = index >= 0
    spill = logits.shape[-1]  # a column for the slots that hold no expert
    scores = logits.new_zeros(logits.shape[0], spill + 1).scatter_add(
        1, torch.where(valid, index, spill), torch.where(valid, weights, 0.0).to(logits.dtype)
    )
    return scores[:, :spill], logits, routing


def _routed_scaled_block_forward(
    block: _Block, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # Llama4TextMoe.forward with the dense expert loop replaced: only the chosen (token,
    # expert) rows are computed, each expert's input scaled by the token's score.
    module = block.block
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    _, logits, routing = block.router(hidden_states)  # through the module: hooks record logits
    index, weights = _token_slots(routing)
    routed = _routed_experts_forward(block, hidden_states, index, weights)
    shared = getattr(module, "shared_expert", None)
    out = routed if shared is None else shared(hidden_states) + routed
    return out, logits


def _routed_experts_forward(
    block: _Block,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    num_tokens, fan_in = top_k_index.shape
    num_experts = block.num_experts
    device = hidden_states.device
    expert_ids = top_k_index.reshape(-1).to(torch.int32)
    # Index -1 (moerouter) and num_experts (transformers' sentinel) both mean "no expert".
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    expert_ids = torch.where(valid, expert_ids, torch.full_like(expert_ids, -1))
    weights = top_k_weights.reshape(-1).float()
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    routing = mr.Routing(
        token_ids=torch.arange(num_tokens, dtype=torch.int32, device=device).repeat_interleave(
            fan_in
        ),
        expert_ids=expert_ids,
        weights=weights,
        choice_ids=expert_ids,
        probs=weights.new_zeros(()).expand(num_tokens, num_experts),
        finite_rows=torch.ones(num_tokens, dtype=torch.bool, device=device),
        num_tokens=num_tokens,
        num_experts=num_experts,
        layout="token",
        slots=fan_in,
    )
    plan = mr.make_plan(routing)
    expert_rows = mr.dispatch(hidden_states, plan)
    if block.scaled_input:
        # Llama-4: each expert's input is scaled by the token's score, its output summed as is.
        # Plan row i holds assignment order[i]; rows past num_valid belong to no expert.
        rows = torch.arange(plan.num_rows, device=device)
        row_weights = weights[plan.order.long().clamp(min=0)]
        row_weights = torch.where(rows < plan.num_valid, row_weights, torch.zeros_like(row_weights))
        expert_rows = expert_rows * row_weights.to(expert_rows.dtype)[:, None]
        plan = dataclasses.replace(plan, combine_weights=(plan.combine_rows >= 0).float())
    out = _grouped_experts(block.experts, expert_rows, plan.group_sizes, block.transposed)
    return mr.combine(out, plan)


def _grouped_experts(
    experts: nn.Module, rows: torch.Tensor, group_sizes: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """The experts module's own computation on expert-grouped rows, with its own parameters."""
    has_gate = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
    has_bias = getattr(experts, "has_bias", False)

    def as_in_out(weight: torch.Tensor) -> torch.Tensor:
        # transformers stores (E, out, in) unless transposed; grouped_mm wants (E, in, out).
        return weight if transposed else weight.transpose(1, 2)

    def expert_of_rows() -> torch.Tensor:
        ends = torch.cumsum(group_sizes, 0)
        positions = torch.arange(rows.shape[0], device=rows.device, dtype=ends.dtype)
        return torch.searchsorted(ends, positions, right=True).clamp(max=group_sizes.shape[0] - 1)

    up_name = "gate_up_proj" if has_gate else "up_proj"
    hidden = grouped_mm(rows, as_in_out(getattr(experts, up_name)), group_sizes)
    owner = expert_of_rows() if has_bias else None
    if owner is not None:
        hidden = hidden + getattr(experts, f"{up_name}_bias")[owner]
    if has_gate and hasattr(experts, "_apply_gate"):
        hidden = experts._apply_gate(hidden)
    elif has_gate:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = experts.act_fn(gate) * up
    else:
        hidden = experts.act_fn(hidden)
    out = grouped_mm(hidden, as_in_out(experts.down_proj), group_sizes)
    if owner is not None:
        out = out + experts.down_proj_bias[owner]
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


# --------------------------------------------------------------------------------------------
# Public functions


def _patch_forward(module: nn.Module, forward: Any) -> tuple[nn.Module, str, Any]:
    """Give one module instance a new forward, keeping hooks others installed on it.

    accelerate's dispatch hooks (``device_map=...``) replace ``forward`` on the instance and
    call the original through ``_old_forward``: that is the one to replace then.
    """
    attribute = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
    previous = module.__dict__.get(attribute)
    module.__dict__[attribute] = forward
    return module, attribute, previous


def _state(model: nn.Module) -> _Model | None:
    state = model.__dict__.get(_STATE)
    return state if isinstance(state, _Model) else None


def _require_state(model: nn.Module, caller: str) -> _Model:
    state = _state(model)
    if state is None:
        raise ValueError(f"{caller}: call route_with_moerouter(model) first")
    return state


PolicyChoice = Any | Callable[[str, Any], Any] | None


def route_with_moerouter(model: nn.Module, policy: PolicyChoice = None) -> nn.Module:
    """Route every MoE block of a transformers model through moerouter.

    Replaces, on each block instance, the forward of its router and of its experts module (see
    the module docstring); parameters, buffers, the state dict and the block's own forward are
    unchanged. Calling it again changes the policy.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model (or any module) holding MoE blocks: a module with an ``experts``
        child and a ``gate`` or ``router`` child.
    policy : moerouter policy, callable or None
        None: each block's reproducing policy (outputs equal the original model's within float32
        rounding). A policy (:class:`moerouter.TopK`, :class:`moerouter.ExpertChoice`, ...): used
        by every block; its ``num_experts`` (plus ``num_null``) must match the router's rows. It
        is also checked on the probe of a block whose router no built-in candidate reproduces,
        and accepted (as that block's reproducing policy) when it reproduces it. A callable
        ``policy(name, reproducing_policy) -> policy``: chooses per block.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        A block whose router or experts moerouter cannot reproduce (the message names its class;
        a router whose forward needs more than the hidden states included), or a model with no
        MoE block.
    ValueError
        A policy whose columns do not match a router's rows.

    Examples
    --------
    >>> import moerouter as mr
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16,
    ...                        num_hidden_layers=2, num_attention_heads=4,
    ...                        num_key_value_heads=2, num_local_experts=4)
    >>> model = route_with_moerouter(MixtralForCausalLM(config))
    >>> route_with_moerouter(model, mr.TopK(num_experts=4, k=1))  # doctest: +ELLIPSIS
    MixtralForCausalLM(...)
    """
    state = _state(model)
    if state is None:
        state = _Model()
        for name, module in _candidate_blocks(model):
            router = _router_of(module)
            if router is None:
                raise _unsupported(module, name, "it has no 'gate' or 'router' submodule")
            linear = _router_linear(router)
            if linear is None:
                raise _unsupported(
                    module,
                    name,
                    f"its router {type(router).__name__} is not a linear layer: it has no 2-D "
                    "'weight' (experts, hidden) nor one nn.Linear child holding it",
                )
            weight = linear.weight
            num_experts, transposed = _check_experts(module, name, module.experts)
            if weight.shape[0] != num_experts:
                raise _unsupported(
                    module,
                    name,
                    f"its router has {weight.shape[0]} rows for {num_experts} experts",
                )
            given = policy if _is_policy(policy) else None
            default = _reproducing_policy(module, name, router, num_experts, given)
            scaled_input = not _takes_routing(module.experts)
            if scaled_input and not _dense_scores(_router_outputs(router, int(weight.shape[1]))):
                raise _unsupported(
                    module,
                    name,
                    f"its experts {type(module.experts).__name__} take no routing and its "
                    "router does not return Llama-4's (dense scores, logits)",
                )
            state.blocks[name] = _Block(
                name,
                module,
                router,
                linear,
                module.experts,
                num_experts,
                default,
                default,
                state,
                transposed=transposed,
                scaled_input=scaled_input,
            )
        if not state.blocks:
            raise TypeError(f"{type(model).__name__} has no MoE block (a module with 'experts')")
        for block in state.blocks.values():
            patches: list[tuple[nn.Module, Callable[..., Any]]]
            if block.scaled_input:
                patches = [
                    (block.router, _routed_dense_router_forward),
                    (block.block, _routed_scaled_block_forward),
                ]
            else:
                patches = [
                    (block.router, _routed_router_forward),
                    (block.experts, _routed_experts_forward),
                ]
            for module, forward in patches:
                state.patches.append(_patch_forward(module, functools.partial(forward, block)))
        model.__dict__[_STATE] = state
    for block in state.blocks.values():
        block.policy = _choose(policy, block)
    return model


def _is_policy(policy: PolicyChoice) -> bool:
    return policy is not None and hasattr(policy, "num_experts")


def _choose(policy: PolicyChoice, block: _Block) -> Any:
    if policy is None:
        chosen = block.default_policy
    elif _is_policy(policy):
        chosen = policy
    elif callable(policy):
        chosen = policy(block.name, block.default_policy)
    else:
        raise TypeError(f"policy must be a moerouter policy, a callable or None, got {policy!r}")
    rows = int(block.linear.weight.shape[0])
    if getattr(chosen, "num_experts", None) != block.num_experts or _policy_columns(chosen) != rows:
        raise ValueError(
            f"policy {chosen!r} does not fit {type(block.block).__name__} ({block.name!r}): "
            f"it has {block.num_experts} experts and its router {rows} rows"
            + ("; use to_adamoe() to add null-expert rows" if hasattr(chosen, "num_null") else "")
        )
    return chosen


def remove_moerouter(model: nn.Module) -> nn.Module:
    """Undo :func:`route_with_moerouter` (and :func:`to_adamoe`): the original forwards return."""
    state = _require_state(model, "remove_moerouter")
    if state.adamoe is not None:
        from_adamoe(model)
    for module, attribute, previous in reversed(state.patches):
        if previous is None:
            del module.__dict__[attribute]
        else:
            module.__dict__[attribute] = previous
    del model.__dict__[_STATE]
    return model


def to_adamoe(
    model: nn.Module,
    num_null: int,
    k: int,
    *,
    null_mode: Literal["pooled", "per_expert"] = "pooled",
    convention: Literal["megatron", "mixtral", "gshard"] = "megatron",
    aux_loss_coef: float | None = None,
) -> nn.Module:
    r"""Convert a softmax top-k MoE model to AdaMoE routing with null experts (Zeng et al. 2024).

    Each router gets ``num_null`` extra rows, initialised as the official AdaMoE code does, by
    tiling the real rows (null row ``j`` starts as a copy of real row ``j mod E``); routing
    switches to :class:`moerouter.NullExperts` with ``k`` choices per token; and the model's
    auxiliary loss becomes the mean over layers of :func:`moerouter.losses.null_load_balancing`
    (``null_mode="pooled"``: the nulls balanced as one bucket, as in the AdaMoE code's ``exp_1``
    and the authors' blog). The loss is attached as transformers attaches its own: when
    ``output_router_logits`` is on (this function turns it on in ``model.config``), the output's
    ``aux_loss`` holds it, ``router_logits`` holds every layer's ``E + m`` logits, and ``loss``
    (when labels are given) gains ``aux_loss_coef * aux_loss``. Padding tokens are counted like
    any other token (transformers' loss masks them).

    AdaMoE renormalises the weights of the real experts a token picked, so with ``num_null=0``
    and the model's own ``k`` the model is unchanged for renormalising routers (Mixtral,
    Qwen with ``norm_topk_prob``); for the others (OLMoE) the weights become renormalised.

    Convert before building the optimizer: the routers' weights become new parameters. To load a
    converted state dict, build the model, call ``route_with_moerouter`` and ``to_adamoe`` with
    the same ``num_null``, then ``load_state_dict``.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers MoE model; routed first if :func:`route_with_moerouter` was not called.
    num_null : int
        Null experts ``m >= 0`` per layer (16 with 8 real experts in the AdaMoE Mixtral run).
    k : int
        Choices per token over real and null experts (4 in that run, where Mixtral had 2).
    null_mode : {"pooled", "per_expert"}
        Passed to :func:`moerouter.losses.null_load_balancing`.
    convention : {"megatron", "mixtral", "gshard"}
        Normalisation of the loss; ``"megatron"`` is 1.0 at uniform routing.
    aux_loss_coef : float, optional
        Weight of the loss in ``loss``; ``model.config.router_aux_loss_coef`` when omitted.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.
    """
    state = _state(model) or _require_state(route_with_moerouter(model), "to_adamoe")
    if state.adamoe is not None:
        raise ValueError("to_adamoe: the model is already AdaMoE; call from_adamoe first")
    if isinstance(num_null, bool) or not isinstance(num_null, int) or num_null < 0:
        raise ValueError(f"num_null must be an int >= 0, got {num_null!r}")
    if null_mode not in ("pooled", "per_expert"):
        raise ValueError(f"null_mode must be 'pooled' or 'per_expert', got {null_mode!r}")
    policies = {}
    for name, block in state.blocks.items():
        if not (
            isinstance(block.default_policy, mr.TopK) and block.default_policy.score == "softmax"
        ):
            raise ValueError(
                f"to_adamoe needs softmax top-k routers, but {type(block.block).__name__} "
                f"({name!r}) routes with {block.default_policy!r}"
            )
        linear_tensors = {id(tensor) for tensor in block.linear.parameters(recurse=False)}
        per_expert = [
            tensor_name
            for tensor_name, tensor in [
                *block.router.named_parameters(),
                *block.router.named_buffers(),
            ]
            if id(tensor) not in linear_tensors and block.num_experts in tensor.shape
        ]
        if per_expert:
            # Ernie 4.5 adds its moe_statics bias (one entry per expert) to the logits: it
            # would not fit the E + m columns.
            raise ValueError(
                f"to_adamoe: the router of {type(block.block).__name__} ({name!r}) holds "
                f"per-expert tensors besides its weight ({', '.join(per_expert)}) that its "
                "forward applies to E columns; null experts would need them widened"
            )
        policies[name] = mr.NullExperts(num_experts=block.num_experts, num_null=num_null, k=k)
    for name, block in state.blocks.items():
        _resize_router(block.linear, block.num_experts + num_null)
        block.policy = policies[name]
    config = getattr(model, "config", None)
    adamoe = _AdaMoE(
        num_null=num_null,
        k=k,
        null_mode=null_mode,
        convention=convention,
        aux_loss_coef=aux_loss_coef,
        output_router_logits_before=getattr(config, "output_router_logits", None),
        hooks=[],
    )
    if config is not None:
        config.output_router_logits = True
    adamoe.hooks = [
        model.register_forward_pre_hook(
            functools.partial(_adamoe_before, adamoe), with_kwargs=True
        ),
        model.register_forward_hook(functools.partial(_adamoe_after, adamoe), with_kwargs=True),
    ]
    state.adamoe = adamoe
    return model


def from_adamoe(model: nn.Module) -> nn.Module:
    """Undo :func:`to_adamoe`: drop the null rows, route as the original model, restore its loss."""
    state = _require_state(model, "from_adamoe")
    adamoe = state.adamoe
    if adamoe is None:
        raise ValueError("from_adamoe: the model is not AdaMoE (to_adamoe was not called)")
    for hook in adamoe.hooks:
        hook.remove()
    for block in state.blocks.values():
        _resize_router(block.linear, block.num_experts)
        block.policy = block.default_policy
    config = getattr(model, "config", None)
    if config is not None and adamoe.output_router_logits_before is not None:
        config.output_router_logits = adamoe.output_router_logits_before
    state.adamoe = None
    return model


def _resize_router(router: nn.Module, rows: int) -> None:
    """Give the router ``rows`` rows: truncate, or append rows tiled from the existing ones."""
    for name in ("weight", "bias"):
        old = getattr(router, name, None)
        if not isinstance(old, nn.Parameter):
            continue
        with torch.no_grad():
            if rows <= old.shape[0]:
                data = old[:rows].clone()
            else:
                real = old.shape[0]
                tiled = old.repeat(math.ceil(rows / real), *([1] * (old.ndim - 1)))
                data = torch.cat([old, tiled[: rows - real]])
        setattr(router, name, nn.Parameter(data, requires_grad=old.requires_grad))


def _adamoe_before(
    adamoe: _AdaMoE, module: nn.Module, args: Any, kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    wanted = kwargs.get("output_router_logits")
    if wanted is None:
        wanted = getattr(getattr(module, "config", None), "output_router_logits", False)
    adamoe.wants_loss = bool(wanted)
    adamoe.records = [] if wanted else None
    # transformers' own loss counts E columns; ours replaces it.
    kwargs["output_router_logits"] = False
    return args, kwargs


def _adamoe_after(
    adamoe: _AdaMoE, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any
) -> Any:
    records, adamoe.records = adamoe.records, None
    if not (adamoe.wants_loss and records) or not hasattr(output, "keys"):
        return output
    aux = torch.stack(
        [
            mr.losses.null_load_balancing(
                routing,
                null_mode=adamoe.null_mode,  # type: ignore[arg-type]
                convention=adamoe.convention,  # type: ignore[arg-type]
            )
            for _, routing in records
        ]
    ).mean()
    output["router_logits"] = tuple(logits for logits, _ in records)
    fields = {item.name for item in dataclasses.fields(output)}
    if "aux_loss" in fields:
        output["aux_loss"] = aux
        loss = output.get("loss")
        if loss is not None:
            coef = adamoe.aux_loss_coef
            if coef is None:
                coef = float(getattr(module.config, "router_aux_loss_coef", 0.001))
            output["loss"] = loss + coef * aux.to(loss.device)
    return output


@contextlib.contextmanager
def routing_statistics(
    model: nn.Module, *, on_routing: Callable[[str, Any, torch.Tensor], None] | None = None
) -> Iterator[RoutingStats]:
    """Collect :func:`moerouter.stats.summary` of every routed block during the ``with`` body.

    ``on_routing(name, routing, logits)``, when given, also receives each block's routing and
    router logits as they are made (:func:`moerouter.traces.record_transformers` records them).

    Examples
    --------
    >>> with routing_statistics(model) as stats:  # doctest: +SKIP
    ...     model(input_ids)
    >>> stats.summary()["model.layers.0.mlp"]["real_experts_per_token"]  # doctest: +SKIP
    2.0
    """
    state = _require_state(model, "routing_statistics")
    collector = RoutingStats(on_routing)
    state.stats.append(collector)
    try:
        yield collector
    finally:
        state.stats.remove(collector)


def save_adamoe(model: nn.Module, path: str) -> None:
    """Save an AdaMoE model (``to_adamoe``) with ``save_pretrained`` plus its conversion.

    ``save_pretrained`` writes the weights with their null rows, but the config does not know
    about them; ``moerouter_adamoe.json`` beside it records ``num_null``, ``k`` and the loss
    options, and ``moerouter_adamoe_routers.safetensors`` every router's rows, so that
    :func:`load_adamoe` rebuilds the same model.
    """
    import json
    import os

    state = _require_state(model, "save_adamoe")
    adamoe = state.adamoe
    if adamoe is None:
        raise ValueError("save_adamoe: the model is not AdaMoE (to_adamoe was not called)")
    config = getattr(model, "config", None)
    before = getattr(config, "output_router_logits", None)
    if config is not None and adamoe.output_router_logits_before is not None:
        config.output_router_logits = adamoe.output_router_logits_before  # the original's
    try:
        model.save_pretrained(path)  # type: ignore[operator]
    finally:
        if config is not None:
            config.output_router_logits = before
    options = {
        "num_null": adamoe.num_null,
        "k": adamoe.k,
        "null_mode": adamoe.null_mode,
        "convention": adamoe.convention,
        "aux_loss_coef": adamoe.aux_loss_coef,
    }
    with open(os.path.join(path, _ADAMOE_FILE), "w") as file:
        json.dump(options, file)
    from safetensors.torch import save_file

    routers = {
        f"{name}.{key}": tensor.detach().contiguous().cpu()
        for name, block in state.blocks.items()
        for key, tensor in block.linear.named_parameters(recurse=False)
    }
    save_file(routers, os.path.join(path, _ROUTERS_FILE))


def load_adamoe(model_class: Any, path: str) -> nn.Module:
    """Load a model saved by :func:`save_adamoe`: null rows, policy and loss as they were.

    ``model_class`` is the transformers class (``MixtralForCausalLM``, ...). Everything but the
    routers loads through ``from_pretrained`` (its checkpoint conversions included); the model
    is converted with the saved options and its routers get the saved rows, null rows included.
    """
    import json
    import os

    from safetensors.torch import load_file

    with open(os.path.join(path, _ADAMOE_FILE)) as file:
        options = json.load(file)
    # The routers' E + m rows do not fit the config's E: they are re-read below.
    model = model_class.from_pretrained(path, ignore_mismatched_sizes=True)
    to_adamoe(model, **options)
    routers = load_file(os.path.join(path, _ROUTERS_FILE))
    state = _require_state(model, "load_adamoe")
    with torch.no_grad():
        for name, block in state.blocks.items():
            for key, tensor in block.linear.named_parameters(recurse=False):
                tensor.copy_(routers[f"{name}.{key}"])
    return model.eval()
