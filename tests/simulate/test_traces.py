"""Traces: record, save, load and replay routings, bit for bit on every backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

import moerouter as mr
from moerouter import traces, workloads
from moerouter.testing import Backend, to_numpy

E = 6


def policies():
    """name -> (policy, logits columns, grouped). Each routing shape a trace must carry."""
    return {
        # Token layout, plain top-k.
        "topk": (mr.TopK(num_experts=E, k=2), E, False),
        # Null experts: choice_ids past E, expert_ids -1, E' = 2E probabilities.
        "null": (mr.NullExperts(num_experts=E, num_null=E, k=3), 2 * E, False),
        # Groups and policy capacity: num_groups and capacity travel, drops are -1.
        "capacity": (mr.TopK(num_experts=E, k=2, capacity_factor=0.5), E, True),
        # Expert layout: token ids are not implied and must be stored.
        "expert_choice": (mr.ExpertChoice(num_experts=E, capacity_factor=1.0), E, True),
    }


def logits_on(backend, columns, grouped, *, nonfinite=True):
    values = workloads.zipf(24, columns, exponent=1.0, seed=4)
    if nonfinite:
        values[5] = np.nan  # a non-finite row routes nowhere; finite_rows records it
    if grouped:
        values = values.reshape(3, 8, columns)
    return backend.asarray(values)


def bits(array):
    values = to_numpy(array)
    if values.dtype.kind == "f":
        return values.view(np.uint32 if values.itemsize == 4 else np.uint64)
    return values


def assert_same_routing(actual, expected):
    for name in ("token_ids", "expert_ids", "weights", "choice_ids", "probs", "finite_rows"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert str(got.dtype) == str(want.dtype), name
        assert type(got).__module__.partition(".")[0] == type(want).__module__.partition(".")[0]
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=name)
    for name in ("num_tokens", "num_experts", "layout", "slots", "num_groups", "capacity"):
        assert getattr(actual, name) == getattr(expected, name), name


@pytest.mark.parametrize("name", list(policies()))
def test_round_trip_is_bit_exact_on_every_backend(name, backend, tmp_path):
    policy, columns, grouped = policies()[name]
    logits = logits_on(backend, columns, grouped)
    router = traces.traced(policy, layer=2, name=name)
    with traces.record(probs=True, logits=True, metadata={"run": name}) as recorder:
        routing = router(logits)
    path = tmp_path / "trace.npz"
    recorder.save(path)
    loaded = traces.load(path)
    assert loaded.version == traces.TRACE_VERSION and loaded.metadata == {"run": name}
    (record,) = loaded.records
    assert (record.layer, record.step, record.name) == (2, 0, name)
    # Back on the backend it came from, every array is the recorded one, bit for bit.
    assert_same_routing(record.routing(like=logits), routing)
    # Replaying the stored logits through the policy routes exactly as the original call.
    assert_same_routing(record.route(policy, like=logits), routing)
    assert_same_routing(next(traces.replay(loaded, policy, like=logits)), routing)


def test_logits_of_any_float_dtype_are_stored_as_the_float32_the_policy_uses(tmp_path):
    torch = pytest.importorskip("torch")
    policy = mr.TopK(num_experts=E, k=2)
    logits = torch.from_numpy(workloads.zipf(16, E, seed=1)).to(torch.bfloat16)
    with traces.record(logits=True) as recorder:
        routing = traces.traced(policy, layer=0)(logits)
    recorder.save(tmp_path / "t.npz")
    record = traces.load(tmp_path / "t.npz").records[0]
    assert record.logits.dtype == np.float32
    np.testing.assert_array_equal(record.logits, logits.float().numpy())  # bfloat16 widens exactly
    assert_same_routing(record.route(policy, like=logits), routing)


def test_file_layout_is_compact_versioned_and_pickle_free(tmp_path):
    policy = mr.TopK(num_experts=E, k=2)
    with traces.record() as recorder:
        traces.traced(policy, layer=0)(workloads.uniform(10, E))
    recorder.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as archive:
        header = json.loads(str(archive["header"][()]))
        assert header["version"] == traces.TRACE_VERSION
        assert archive["0.expert_ids"].dtype == np.int16  # E' < 32767: two bytes per id
        assert "0.token_ids" not in archive.files  # implied by the token layout
        assert "0.probs" not in archive.files and "0.logits" not in archive.files
    # Without probs the routing's probs are zero; the load figures do not read them.
    record = traces.load(tmp_path / "t.npz").records[0]
    routing = record.routing()
    assert not routing.probs.any()
    np.testing.assert_array_equal(
        mr.stats.summary(routing)["tokens_per_expert"],
        mr.stats.summary(policy(workloads.uniform(10, E)))["tokens_per_expert"],
    )
    with pytest.raises(ValueError, match="holds no logits"):
        record.route(policy)


def test_newer_or_foreign_files_are_refused(tmp_path):
    with traces.record() as recorder:
        traces.traced(mr.TopK(num_experts=E, k=1), layer=0)(workloads.uniform(3, E))
    recorder.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as archive:
        arrays = dict(archive)
    header = json.loads(str(arrays["header"][()]))
    header["version"] = traces.TRACE_VERSION + 1
    arrays["header"] = np.asarray(json.dumps(header))
    np.savez(tmp_path / "newer.npz", **arrays)
    with pytest.raises(ValueError, match="version"):
        traces.load(tmp_path / "newer.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a moerouter trace"):
        traces.load(tmp_path / "other.npz")


def test_recording_is_off_outside_the_block_and_never_copies(monkeypatch):
    policy = mr.TopK(num_experts=E, k=2)
    router = traces.traced(policy, layer=0)
    logits = workloads.uniform(8, E)

    def no_copy(array):
        raise AssertionError("a host copy was made while recording was off")

    # Every host copy of the package goes through to_numpy, looked up in the module that copies.
    from moerouter.traces import _record, _recording

    monkeypatch.setattr(_record, "to_numpy", no_copy)
    monkeypatch.setattr(_recording, "to_numpy", no_copy)
    routing = router(logits)  # off: routes only
    expected = policy(logits)
    np.testing.assert_array_equal(routing.expert_ids, expected.expert_ids)
    assert router.num_experts == E and router.k == 2  # stands in for the policy
    monkeypatch.undo()
    with traces.record() as recorder:
        router(logits)
        router(logits)
        traces.traced(policy, layer=1)(logits)
    router(logits)  # after the block: nothing more
    assert [(r.layer, r.step) for r in recorder.trace] == [(0, 0), (0, 1), (1, 0)]
    assert recorder.trace.layers == [0, 1] and recorder.trace.steps == [0, 1]


def test_recorders_nest_and_the_inner_one_wins():
    router = traces.traced(mr.TopK(num_experts=E, k=1), layer=0)
    with traces.record() as outer:
        router(workloads.uniform(2, E))
        with traces.record() as inner:
            router(workloads.uniform(3, E))
        router(workloads.uniform(4, E))
    assert [r.num_tokens for r in outer.trace] == [2, 4]
    assert [r.num_tokens for r in inner.trace] == [3]


def test_manual_add_with_token_metadata():
    routing = mr.TopK(num_experts=E, k=2)(workloads.uniform(4, E).reshape(2, 2, E))
    recorder = traces.Recorder()
    record = recorder.add(routing, layer=5, step=3)
    # By default each group is a sequence.
    assert record.sequence.tolist() == [0, 0, 1, 1] and record.position.tolist() == [0, 1, 0, 1]
    record = recorder.add(
        routing, layer=5, sequence=np.array([7, 7, 7, 8]), position=np.array([4, 5, 6, 0])
    )
    assert record.step == 4 and record.sequence.tolist() == [7, 7, 7, 8]
    with pytest.raises(ValueError, match="sequence"):
        recorder.add(routing, layer=0, sequence=np.zeros(3, dtype=np.int32))


def test_recording_inside_jax_jit_says_why_it_cannot():
    jax = pytest.importorskip("jax")
    router = traces.traced(mr.TopK(num_experts=E, k=2), layer=0)
    logits = jax.numpy.asarray(workloads.uniform(4, E))
    jitted = jax.jit(lambda values: router(values).expert_ids)
    with traces.record() as recorder, pytest.raises(TypeError, match=r"jax\.jit"):
        jitted(logits)
    assert not recorder.trace.records
    # Outside jit the same wrapper records JAX routings.
    with traces.record() as recorder:
        router(logits)
    assert recorder.trace.records[0].expert_ids.shape == (8,)


def test_concatenate_lays_ranks_end_to_end():
    policy = mr.ExpertChoice(num_experts=E, capacity_factor=1.0)
    parts = [
        traces.TraceRecord.from_routing(policy(workloads.uniform(n, E, seed=n)), layer=1)
        for n in (8, 12)  # the same capacity, C = ceil(8 / 6) = ceil(12 / 6) = 2
    ]
    joined = traces.concatenate(parts)
    assert joined.num_tokens == 20 and joined.num_groups == 2
    np.testing.assert_array_equal(
        joined.token_ids, np.concatenate([parts[0].token_ids, parts[1].token_ids + 8])
    )
    assert joined.sequence.tolist() == [0] * 8 + [1] * 12
    other_layer = traces.TraceRecord.from_routing(policy(workloads.uniform(6, E)), layer=2)
    with pytest.raises(ValueError, match="layer"):
        traces.concatenate([parts[0], other_layer])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: traces.traced(mr.TopK(num_experts=2, k=1), layer=-1), ValueError, "layer"),
        (lambda: traces.traced("topk", layer=0), TypeError, "policy"),
        (lambda: traces.save([], "x.npz"), TypeError, "trace"),
        (lambda: traces.TraceRecord.from_routing(np.zeros(3)), TypeError, "routing"),
        (lambda: traces.concatenate([]), TypeError, "records"),
    ],
)
def test_bad_input_names_the_parameter(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_metadata_must_be_json(tmp_path):
    with traces.record(metadata={"bad": object()}) as recorder:
        pass
    with pytest.raises(TypeError, match="metadata"):
        recorder.save(tmp_path / "t.npz")


def test_record_transformers_keeps_layers_and_token_metadata(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from moerouter_torch.integrations.transformers import route_with_moerouter, routing_statistics

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = route_with_moerouter(transformers.MixtralForCausalLM(config).eval())
    tokens = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), routing_statistics(model) as stats:
        with traces.record_transformers(model, logits=True) as recorder:
            model(tokens)
            model(tokens[:, :2], position_ids=torch.tensor([[7, 8]]))
    trace = recorder.trace
    names = ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [(r.name, r.layer, r.step) for r in trace] == [
        (names[0], 0, 0),
        (names[1], 1, 0),
        (names[0], 0, 1),
        (names[1], 1, 1),
    ]
    first, second = trace.records[0], trace.records[2]
    assert first.sequence.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert first.position.tolist() == list(range(5)) * 3
    assert second.position.tolist() == [7, 8] * 3  # the given position ids
    # The trace holds the decisions the statistics saw.
    summed = sum(
        np.bincount(r.expert_ids[r.expert_ids >= 0], minlength=4) for r in trace if r.layer == 0
    )
    assert summed.tolist() == stats.summary()[names[0]]["tokens_per_expert"]
    # And the recorded logits replay through the block's policy to the same decision.
    np.testing.assert_array_equal(
        first.route(mr.TopK(num_experts=4, k=2)).expert_ids, first.expert_ids
    )
    recorder.save(tmp_path / "model.npz")
    assert len(traces.load(tmp_path / "model.npz")) == 4


def test_backend_enum_covers_what_the_round_trip_promises():
    # "every backend": NumPy, array-api-strict, torch, JAX (and CuPy where a GPU is present).
    assert {b.value for b in Backend} >= {"numpy", "array_api_strict", "torch", "jax"}
