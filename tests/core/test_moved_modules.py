"""Import paths moved by the core layout (issue 17) keep working: same objects.

Each old path is a thin alias module giving the very module (or the very names) of the new
home. ``moerouter.policies.{cosine,noise,smoe_dropout}`` warn (DeprecationWarning): their names
stay public as ``mr.policies.X``. ``moerouter.{multitask,...}`` do not warn: ``mr.multitask`` is
public, and ``from moerouter.multitask import f`` is the same path. Run in a subprocess so
that a module already imported by another test cannot hide a missing alias or a missing warning.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# (old import path, new home, a name both must give)
DEPRECATED = [
    # gates (what produces or perturbs logits) left policies/
    ("moerouter.policies.cosine", "moerouter.gates.cosine", "cosine_router_logits"),
    ("moerouter.policies.noise", "moerouter.gates.noise", "gaussian_noise"),
    # SMoE-Dropout split into its gate and its schedule
    ("moerouter.policies.smoe_dropout", "moerouter.gates.frozen_random", "FrozenRandomRouter"),
    ("moerouter.policies.smoe_dropout", "moerouter.methods.smoe_dropout", "k_schedule"),
]


def _run(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# the seed-paper method modules now sit in methods/; the old paths are public (mr.multitask)
METHODS = [
    ("moerouter.multitask", "moerouter.methods.multitask", "multi_gate"),
    ("moerouter.confidence", "moerouter.methods.confidence", "dispersion"),
    ("moerouter.ensemble", "moerouter.methods.ensemble", "domain_posterior"),
    ("moerouter.merging", "moerouter.methods.merging", "group_experts"),
    ("moerouter.distillation", "moerouter.methods.distillation", "binary_kl"),
]


@pytest.mark.parametrize(("old", "new", "name"), METHODS)
def test_method_module_paths_are_the_new_modules(old: str, new: str, name: str) -> None:
    # Both orders: the old path imported first (before moerouter), and after mr.X exists.
    for first in (old, "moerouter"):
        _run(
            f"""
            import importlib, warnings
            warnings.simplefilter("error")
            importlib.import_module("{first}")
            old = importlib.import_module("{old}")
            new = importlib.import_module("{new}")
            assert old is new, (old, new)
            from {old} import {name}
            assert {name} is getattr(new, "{name}")
            """
        )


@pytest.mark.parametrize(("old", "new", "name"), DEPRECATED)
def test_old_path_gives_the_new_objects_with_a_warning(old: str, new: str, name: str) -> None:
    _run(
        f"""
        import importlib, warnings
        import moerouter as mr
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = importlib.import_module("{old}")
        assert any(issubclass(w.category, DeprecationWarning) and "{old}" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        new = importlib.import_module("{new}")
        assert getattr(old, "{name}") is getattr(new, "{name}")
        """
    )


def test_public_names_did_not_move_and_do_not_warn() -> None:
    # Why: mr.multitask, mr.policies.k_schedule, ... are the stable public paths; importing
    # moerouter must not touch a deprecated alias (warnings are errors in CI).
    _run(
        """
        import sys, warnings
        warnings.simplefilter("error")
        import moerouter as mr
        from moerouter.methods import multitask, smoe_dropout
        from moerouter.gates import FrozenRandomRouter, gaussian_noise
        assert mr.multitask is multitask and mr.methods.multitask is multitask
        assert mr.FrozenRandomRouter is FrozenRandomRouter is mr.policies.FrozenRandomRouter
        assert mr.gaussian_noise is gaussian_noise is mr.policies.gaussian_noise
        assert mr.k_schedule is smoe_dropout.k_schedule is mr.policies.k_schedule
        assert mr.policies.locality_loss is mr.losses.locality_loss
        # LocMoE's gates left policies/locality.py for gates/locality.py
        from moerouter.gates.locality import affinity_scores, grouped_average_pooling
        from moerouter.policies import locality
        assert mr.policies.affinity_scores is mr.gates.affinity_scores is affinity_scores
        assert locality.affinity_scores is affinity_scores
        assert mr.policies.grouped_average_pooling is grouped_average_pooling
        assert locality.grouped_average_pooling is grouped_average_pooling
        from moerouter.multitask import multi_gate  # noqa: F401  (mr.multitask is loaded)
        """
    )


def test_private_names_other_branches_import_stay() -> None:
    # Why: branches written against the earlier layout import these private names.
    _run(
        """
        import warnings
        warnings.simplefilter("error")
        from moerouter._numerics import check_array, sigmoid, softplus, log_softmax, pick_columns
        from moerouter.policies._common import (
            CleanLogits, capacity, check_positive_int, clean_logits, drop_over_capacity,
            finite_rows, to_float32,
        )
        from moerouter.policies._token_choice import (
            masked_softmax, renormalize, softmax, token_choice_routing,
        )
        from moerouter.losses import _check_routing, _erfc, _normal_cdf, _valid_tokens
        from moerouter._agnostic import scores
        from moerouter import _validation
        assert sigmoid is scores.sigmoid and softmax is scores.softmax
        assert check_positive_int is _validation.check_positive_int
        """
    )


# testing/: the reference*.py files split by batch became testing/reference/, split by subject;
# the old modules re-export (no warning: plugins and older branches import them in tests).
REFERENCES = [
    ("moerouter.testing.reference_adaptive", "adaptive", "reference_top_p"),
    ("moerouter.testing.reference_assignment", "transport", "reference_sinkhorn_plan"),
    ("moerouter.testing.reference_assignment", "soft", "reference_soft_moe"),
    ("moerouter.testing.reference_losses", "losses", "reference_load_loss"),
    ("moerouter.testing.reference_losses", "stats", "reference_co_occurrence"),
    ("moerouter.testing.reference_methods", "methods", "reference_dispersion"),
    ("moerouter.testing.reference_papers", "ensemble", "reference_domain_posterior"),
    ("moerouter.testing.reference_papers", "merging", "reference_group_experts"),
    ("moerouter.testing.reference_papers", "locality", "reference_locality_topk"),
    ("moerouter.testing.reference_papers", "methods", "reference_anchor_mean_logits"),
    ("moerouter.testing.reference_routing", "token_choice", "reference_deepseek"),
    ("moerouter.testing.reference_routing", "gates", "reference_vmoe_logit_noise"),
    ("moerouter.testing.reference_routing", "plan", "reference_padded_plan"),
    # the old single module is now the package: its names (public and private) stay there
    ("moerouter.testing.reference", "token_choice", "reference_topk"),
    ("moerouter.testing.reference", "capacity", "drop_over_capacity"),
    ("moerouter.testing.reference", "_common", "_grouped_float32"),
    ("moerouter.testing.reference", "losses", "reference_z_loss"),
]


@pytest.mark.parametrize(("old", "subject", "name"), REFERENCES)
def test_old_reference_paths_give_the_new_objects(old: str, subject: str, name: str) -> None:
    _run(
        f"""
        import importlib, warnings
        warnings.simplefilter("error")
        old = importlib.import_module("{old}")
        new = importlib.import_module("moerouter.testing.reference.{subject}")
        assert getattr(old, "{name}") is getattr(new, "{name}")
        """
    )


def test_every_old_reference_name_stays_importable() -> None:
    # Why: an old module's whole __all__ must survive the split, not only the sampled names.
    _run(
        """
        import importlib, warnings
        warnings.simplefilter("error")
        import moerouter.testing.reference as package
        for old in ("adaptive", "assignment", "losses", "methods", "papers", "routing"):
            module = importlib.import_module(f"moerouter.testing.reference_{old}")
            for name in module.__all__:
                assert getattr(package, name) is getattr(module, name), (old, name)
        assert sorted(package.__all__) == package.__all__
        """
    )
