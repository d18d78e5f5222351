"""Which MoE families of ``transformers`` :func:`route_with_moerouter` routes, and which it refuses.

One table, read by the tests (``backends/torch/tests/test_transformers_families.py``: every MoE
family of the installed transformers must be listed here, every supported family is routed on a
tiny random model and compared with the original) and by the docs (the support table of
``docs/integrations/transformers.rst`` is generated from :data:`FAMILIES`).

A family is the name of its folder under ``transformers/models``. An MoE family is one whose
modeling code builds an ``experts`` module (:func:`moe_families`).
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


_MIXED_ATTENTION = "the default config's attention sizes do not shrink with hidden_size"

FAMILIES: dict[str, Family] = {
    "afmoe": _DEEPSEEK,  # sigmoid, per-call expert_bias, route_scale
    "aria": _SOFTMAX,
    "axk1": _DEEPSEEK,
    "axk2": _not_built(_MIXED_ATTENTION),
    "bailing_hybrid": _DEEPSEEK,
    "beam": _DEEPSEEK,
    "cohere2_moe": _SOFTMAX,
    "dbrx": _not_built(
        "its nested attn_config/ffn_config are not shrunk by the generic tiny config; its block "
        "routes in route_tokens_to_experts (softmax top-k, L_p-normalised), not in the router"
    ),
    "deepseek_ocr2": _not_built("the vision-language config has no buildable text model alone"),
    "deepseek_v2": _SOFTMAX,
    "deepseek_v3": _DEEPSEEK,
    "deepseek_v32": _not_built("its indexer's head sizes do not follow the tiny config"),
    "deepseek_v4": _refused(
        "its first layers route by hashing the token ids (DeepseekV4HashRouter takes input_ids): "
        "moerouter gives a policy only logits and a per-expert bias",
        r"'input_ids'",
    ),
    "diffusion_gemma": _not_built("per-layer configs (config.per_layer_config) are not shrunk"),
    "dots1": _not_built("its default config leaves sizes the tiny config needs unset (None)"),
    "dots3_note": _not_built("per-layer configs (config.per_layer_config) are not shrunk"),
    "ernie4_5_moe": Family(
        "TopK",
        "softmax",
        no_adamoe="its router adds a per-expert bias (moe_statics) of E entries to the logits",
    ),
    "ernie4_5_vl_moe": _not_built(
        "the tiny text config has no multimodal expert split (text/vision experts of size 0)"
    ),
    "exaone_moe": _DEEPSEEK,
    "flex_olmo": _SOFTMAX,
    "flint": _SIGMOID,
    "gemma4": _not_built("MoE layers are enabled per layer (per_layer_config), not shrunk"),
    "glm4_moe": _DEEPSEEK,
    "glm4_moe_lite": _DEEPSEEK,
    "glm4v_moe": _not_built(
        "the default M-RoPE sections (8, 12, 12) do not fit a tiny head size; a config issue"
    ),
    "glm5_next": _not_built(_MIXED_ATTENTION),
    "glm_moe_dsa": _not_built(_MIXED_ATTENTION),
    "gpt_oss": _SOFTMAX,
    "granitemoe": _SOFTMAX,
    "granitemoe_swa": _SOFTMAX,
    "granitemoehybrid": _not_built("its Mamba head sizes do not follow the tiny config"),
    "granitemoeshared": _SOFTMAX,
    "hunyuan_v1_moe": _SOFTMAX,  # the router's weight lives in its nn.Linear child 'wg'
    "hy_v3": _DEEPSEEK,  # per-call e_score_correction_bias, router_scaling_factor
    "hy_v4": _not_built(_MIXED_ATTENTION),
    "inkling": _not_built("the audio-text config's default sizes do not follow the tiny config"),
    "inkling2": _DEEPSEEK,
    "jamba": _SOFTMAX,
    "jetmoe": _refused(
        "mixture of attention heads: its attention block has 'experts' but no 'gate' or "
        "'router' child; moerouter routes MLP experts only",
        r"JetMoeAttention.*no 'gate' or 'router'",
    ),
    "kimi_linear": _DEEPSEEK,
    "kolibri1": _DEEPSEEK,
    "laguna": _DEEPSEEK,
    "lfm2_moe": _not_built(
        "its default config derives layer types from sizes the tiny config leaves unset; "
        "a config issue, not the integration"
    ),
    "llama4": _refused(
        "Llama-4 multiplies each expert's input by its sigmoid top-1 score (not its output) and "
        "stores experts as (experts, hidden, 2 * intermediate): moerouter's combine scales outputs",
        r"Llama4TextMoe.*expert input width",
    ),
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
    "mistral_large4": _not_built(_MIXED_ATTENTION),
    "mixtral": _SOFTMAX,
    "muse_spark": _refused(
        "its experts module's weights are stored (experts, hidden, out) without transformers' "
        "is_transposed flag, so their input width does not match the router's",
        r"MuseSparkMoE.*expert input width",
    ),
    "nemotron_h": _DEEPSEEK,
    "nllb_moe": _not_built(
        "an encoder-decoder: the generic tiny model is called with input_ids only; its top-2 "
        "router with a random second-expert policy is not reproduced by any moerouter policy"
    ),
    "olmoe": _SOFTMAX,
    "openai_privacy_filter": _DEEPSEEK_SOFTMAX,
    "phimoe": _refused(
        "SparseMixer routing (a masked softmax per choice with a jitter threshold) has no "
        "moerouter policy",
        r"PhimoeSparseMoeBlock.*could not reproduce",
    ),
    "qwen2_moe": _SOFTMAX,
    "qwen3_5_moe": _SOFTMAX,
    "qwen3_moe": _SOFTMAX,
    "qwen3_next": _SOFTMAX,
    "qwen3_omni_moe": _not_built("thinker/talker configs: no single text model to build"),
    "qwen3_vl_moe": _SOFTMAX,
    "qwen4_exp": _not_built("its default config leaves head sizes unset (None)"),
    "solar_open": _DEEPSEEK,
    "step3p7": _not_built("its default config has no sliding_window for its sliding layers"),
    "switch_transformers": _not_built(
        "an encoder-decoder: the generic tiny model is called with input_ids only"
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
