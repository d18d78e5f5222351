"""Which MoE families of ``transformers`` :func:`route_with_moerouter` routes, and which it refuses.

One table, read by the tests (``backends/torch/tests/test_transformers_families.py``: every MoE
family of the installed transformers must be listed here, every supported family is routed on a
tiny random model and compared with the original) and by the docs (the support table of
``docs/integrations/transformers.rst`` is generated from :data:`FAMILIES`).

A family is the name of its folder under ``transformers/models``. An MoE family is one whose
modeling code builds an ``experts`` module (:func:`moe_families`). The three families new in
transformers 5.24 (``hy_v4_vl``, ``inkling2_loop``, ``lara_mini``) are listed too: the tests
check them when 5.24 is installed.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

__all__ = ["FAMILIES", "Family", "moe_families"]


@dataclass(frozen=True)
class Family:
    """One transformers MoE family and what moerouter does with it.

    Attributes
    ----------
    policy : str
        The reproducing policy's class (``"TopK"`` or ``"DeepSeekTopK"``), or ``""`` when refused
        or not built.
    score : str
        Its score function: ``"softmax"`` or ``"sigmoid"``.
    refused : str
        Why :func:`route_with_moerouter` refuses the family (its ``TypeError`` says so); empty
        when supported.
    refused_match : str
        A regular expression the refusal message matches (checked by the tests).
    not_built : str
        Why the tests build no tiny model of the family from its default configuration; the
        integration is then not exercised on it.
    no_adamoe : str
        Why :func:`to_adamoe` refuses a softmax top-k family (its ``ValueError`` says so).
    """

    policy: str = ""
    score: str = "softmax"
    refused: str = ""
    refused_match: str = ""
    not_built: str = ""
    no_adamoe: str = ""

    @property
    def adamoe(self) -> bool:
        """:func:`to_adamoe` applies: the router is a softmax top-k and ``no_adamoe`` is empty."""
        return self.policy == "TopK" and self.score == "softmax" and not self.no_adamoe

    @property
    def status(self) -> str:
        """``"supported"``, ``"refused"`` or ``"not built"``."""
        if self.refused:
            return "refused"
        return "not built" if self.not_built else "supported"


_SOFTMAX = Family("TopK", "softmax")
_SIGMOID = Family("TopK", "sigmoid")
_DEEPSEEK = Family("DeepSeekTopK", "sigmoid")
_DEEPSEEK_SOFTMAX = Family("DeepSeekTopK", "softmax")


def _refused(reason: str, match: str) -> Family:
    return Family(refused=reason, refused_match=match)


def _not_built(reason: str) -> Family:
    return Family(not_built=reason)


FAMILIES: dict[str, Family] = {
    "afmoe": _DEEPSEEK,  # sigmoid, per-call expert_bias, route_scale
    "aria": _SOFTMAX,
    "axk1": _DEEPSEEK,
    "axk2": _DEEPSEEK,
    "bailing_hybrid": _DEEPSEEK,
    "beam": _DEEPSEEK,
    "cohere2_moe": _SOFTMAX,
    "dbrx": _refused(
        "unfused experts: DbrxExperts holds w1, v1, w2 as (experts * ffn, hidden) matrices, not "
        "fused 3-D gate_up_proj/down_proj; and its router returns only logits (the block's "
        "route_tokens_to_experts makes an L_p-normalised softmax top-k, L_2 not in moerouter)",
        r"DbrxFFN.*DbrxExperts does not hold fused 3-D",
    ),
    "deepseek_ocr2": _SOFTMAX,
    "deepseek_v2": _SOFTMAX,
    "deepseek_v3": _DEEPSEEK,
    "deepseek_v32": _DEEPSEEK,
    "deepseek_v4": _refused(
        "its first layers route by hashing the token ids (DeepseekV4HashRouter takes input_ids): "
        "moerouter gives a policy only logits and a per-expert bias",
        r"'input_ids'",
    ),
    "diffusion_gemma": _not_built("per-layer configs (config.per_layer_config) are not shrunk"),
    "dots1": _DEEPSEEK,
    "dots3_note": _not_built("per-layer configs (config.per_layer_config) are not shrunk"),
    "ernie4_5_moe": Family(
        "TopK",
        "softmax",
        no_adamoe="its router adds a per-expert bias (moe_statics) of E entries to the logits",
    ),
    "ernie4_5_vl_moe": Family(
        "TopK",
        "softmax",
        no_adamoe="its routers add a per-expert bias (moe_statics) of E entries to the logits",
    ),
    "exaone_moe": _DEEPSEEK,
    "flex_olmo": _SOFTMAX,
    "flint": _SIGMOID,
    "gemma4": _refused(
        "per-expert output scale: its router multiplies the renormalised top-k weights by a "
        "learned per_expert_scale (moerouter has no per-expert weight scale), and takes k "
        "from config.top_k_experts, not a top_k attribute",
        r"Gemma4TextRouter has no int top_k",
    ),
    "glm4_moe": _DEEPSEEK,
    "glm4_moe_lite": _DEEPSEEK,
    "glm4v_moe": _DEEPSEEK,
    "glm5_next": _DEEPSEEK,
    "glm_moe_dsa": _DEEPSEEK,
    "gpt_oss": _SOFTMAX,
    "granitemoe": _SOFTMAX,
    "granitemoe_swa": _SOFTMAX,
    "granitemoehybrid": _SOFTMAX,
    "granitemoeshared": _SOFTMAX,
    "hunyuan_v1_moe": _SOFTMAX,  # the router's weight lives in its nn.Linear child 'wg'
    "hy_v3": _DEEPSEEK,  # per-call e_score_correction_bias, router_scaling_factor
    "hy_v4": _DEEPSEEK,
    "hy_v4_vl": _DEEPSEEK,  # transformers 5.24
    "inkling": _refused(
        "extra-column router: E + n_shared_experts rows, the last scoring the shared experts; "
        "their sigmoid joins the chosen experts' in the normalisation and gates the shared "
        "experts (a 4th router output). moerouter policies normalise over the chosen experts",
        r"InklingMoE.*router has 10 rows for 8 experts",
    ),
    "inkling2": _DEEPSEEK,
    "inkling2_loop": _DEEPSEEK,  # transformers 5.24
    "jamba": _SOFTMAX,
    "jetmoe": _refused(
        "mixture of attention heads (JetMoeMoA: top-k query/output projections per token) "
        "with no 'gate' or 'router' child; its MLP MoE (JetMoeMoE) has no 'experts' module "
        "(input_linear/output_linear) and a router returning expert-sorted gates",
        r"JetMoeAttention.*no 'gate' or 'router'",
    ),
    "kimi_linear": _DEEPSEEK,
    "kolibri1": _DEEPSEEK,
    "laguna": _DEEPSEEK,
    "lara_mini": _SOFTMAX,  # transformers 5.24
    "lfm2_moe": _DEEPSEEK,  # sigmoid, optional per-call expert_bias
    "llama4": _SIGMOID,  # expert input scaled by the score; its dense expert loop replaced
    "longcat_flash": _refused(
        "zero-computation experts: the router has n_routed_experts + zero_expert_num rows and "
        "the extra experts return their input (identity), which moerouter has no expert for",
        r"LongcatFlashMoE.*not \(experts",
    ),
    "mellum": _SOFTMAX,
    "mimo_v2_flash": _DEEPSEEK,
    "minimax": _SOFTMAX,
    "minimax_m2": _DEEPSEEK,  # per-call e_score_correction_bias
    "minimax_m3_vl": _DEEPSEEK,
    "mistral4": _DEEPSEEK_SOFTMAX,
    "mistral_large4": _DEEPSEEK_SOFTMAX,  # group-limited softmax, no bias
    "mixtral": _SOFTMAX,
    "muse_spark": _DEEPSEEK,  # experts on a projected width (moe_hidden_size)
    "nemotron_h": _DEEPSEEK,
    "nllb_moe": _refused(
        "unfused experts (one module per expert) and a top-2 router with capacity, a random "
        "second-expert policy and a one-hot dispatch mask as output",
        r"NllbMoeSparseMLP.*NllbMoeExperts does not hold fused 3-D",
    ),
    "olmoe": _SOFTMAX,
    "openai_privacy_filter": _DEEPSEEK_SOFTMAX,
    "phimoe": _refused(
        "SparseMixer: each choice is weighted by a softmax over the logits within a relative "
        "jitter threshold of it, the previous choices masked; in training a Gumbel-sampled "
        "choice with Heun's third-order gradient estimate. moerouter has no such policy",
        r"PhimoeSparseMoeBlock.*could not reproduce",
    ),
    "qwen2_moe": _SOFTMAX,
    "qwen3_5_moe": _SOFTMAX,
    "qwen3_moe": _SOFTMAX,
    "qwen3_next": _SOFTMAX,
    "qwen3_omni_moe": _not_built("thinker/talker configs: no single text model to build"),
    "qwen3_vl_moe": _SOFTMAX,
    "qwen4_exp": _SOFTMAX,
    "solar_open": _DEEPSEEK,
    "step3p7": _DEEPSEEK,
    "switch_transformers": _refused(
        "unfused experts (one module per expert) and a top-1 router with per-sequence "
        "capacity returning a one-hot dispatch mask",
        r"SwitchTransformersSparseMLP.*SwitchTransformersExperts does not hold fused 3-D",
    ),
    "unlimited_ocr": _SOFTMAX,
    "vitpose_backbone": _not_built("a vision backbone: no text model to build"),
    "zaya": _refused(
        "its router is an MLP with a skip expert (E + 1 classes) and state passed between "
        "layers, not a linear layer",
        r"ZayaRouter is not a linear layer",
    ),
}


def moe_families() -> list[str]:
    """The MoE families of the installed transformers: model folders whose modeling code builds
    an ``experts`` module (``self.experts = ...``)."""
    import transformers

    root = pathlib.Path(transformers.__file__).parent / "models"
    pattern = re.compile(r"self\.experts\s*=")
    return sorted(
        {
            path.parent.name
            for path in root.glob("*/modeling_*.py")
            if pattern.search(path.read_text())
        }
    )
