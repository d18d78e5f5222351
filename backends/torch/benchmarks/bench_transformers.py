"""Routed vs original transformers MoE models on CPU: forward and forward+backward time.

Tiny random models (2 layers, hidden 64, 8 experts, k = 2, batch 4 x 64 tokens, float32) of
Mixtral, Qwen3-MoE, DeepSeek-V3 and OLMoE, measured in the same run. Also checks that greedy
``generate`` gives the same tokens.

Made for a loaded machine: the two models run in interleaved pairs (``--repeats`` of them, the
order swapped every pair so neither always runs first), each pair gives one ratio routed /
original, and the table reports the median ratio with its quartiles. Times are per-thread CPU
time (``time.thread_time``) with torch on one thread (``--threads 1``), which other processes
competing for the cores do not inflate; the wall-clock median ratio is printed beside it.

    python backends/torch/benchmarks/bench_transformers.py [--repeats 21] [--threads 1]

A measurement, not a test: compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers
from moerouter_torch.integrations.transformers import route_with_moerouter

COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "Mixtral": transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**COMMON, intermediate_size=128, num_local_experts=8)
        ),
        "Qwen3-MoE": transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                **COMMON,
                intermediate_size=128,
                moe_intermediate_size=128,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                head_dim=16,
            )
        ),
        "DeepSeek-V3": transformers.DeepseekV3ForCausalLM(
            transformers.DeepseekV3Config(
                **COMMON,
                intermediate_size=128,
                moe_intermediate_size=128,
                n_shared_experts=1,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=0,
                kv_lora_rank=32,
                q_lora_rank=None,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
            )
        ),
        "OLMoE": transformers.OlmoeForCausalLM(
            transformers.OlmoeConfig(
                **COMMON, intermediate_size=128, num_experts=8, num_experts_per_tok=2
            )
        ),
    }


def _time(step, model) -> tuple[float, float]:
    """(CPU time of this thread, wall time) of one call, in seconds."""
    cpu, wall = time.thread_time(), time.perf_counter()
    step(model)
    return time.thread_time() - cpu, time.perf_counter() - wall


def _pairs(step, original, routed, repeats: int) -> list[tuple[tuple[float, float], ...]]:
    """``repeats`` (original, routed) timings, interleaved, the order swapped every pair."""
    pairs = []
    for index in range(repeats):
        if index % 2:
            mine, base = _time(step, routed), _time(step, original)
        else:
            base, mine = _time(step, original), _time(step, routed)
        pairs.append((base, mine))
    return pairs


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, batch 4 x 64 tokens, float32, "
        f"{args.repeats} interleaved pairs"
    )
    print(
        "| model | forward original CPU ms | forward ratio [quartiles] | wall ratio "
        "| fwd+bwd original CPU ms | fwd+bwd ratio [quartiles] | wall ratio "
        "| greedy generate identical |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, original in models().items():
        original = original.float().eval()
        routed = route_with_moerouter(copy.deepcopy(original))

        def forward(model=None):
            with torch.no_grad():
                model(ids)

        def forward_backward(model=None):
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        row = []
        for step in (forward, forward_backward):
            step(original), step(routed)  # warm up
            pairs = _pairs(step, original, routed, args.repeats)
            base_cpu = statistics.median(base[0] for base, _ in pairs) * 1e3
            low, ratio, high = _quartiles([mine[0] / base[0] for base, mine in pairs])
            wall = statistics.median(mine[1] / base[1] for base, mine in pairs)
            row += [f"{base_cpu:.1f}", f"{ratio:.2f} [{low:.2f}, {high:.2f}]", f"{wall:.2f}"]
        prompt = ids[:2, :8]
        with torch.no_grad():
            expected = original.generate(prompt, max_new_tokens=16, do_sample=False)
            actual = routed.generate(prompt, max_new_tokens=16, do_sample=False)
        row.append("yes" if torch.equal(expected, actual) else "NO")
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
