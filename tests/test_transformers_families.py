"""Causal-LM families beyond the declared ones: accepted by default, exact or refused by name.

``_hf_families.outcome`` builds a family's model from its default config shrunk to a few units and
compares the patched training step (loss and every gradient) with stock. The families here are the
ones the patch accepts without a declaration (their post-processing read from the config, a multimodal
config's from its text config) and the kinds of forward it refuses; ``CROSSENT_ALL_FAMILIES=1`` runs
every family of the installed transformers (about two minutes; the table of docs/transformers.md is
``python tests/_hf_families.py``), where none may be ``wrong``.
"""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("transformers")

from _hf_families import families, outcome

from crossent.integrations import _families

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)

#: model_type -> (text-config attributes to set, the expected verdict, a fragment of its reason)
SAMPLE = {
    "olmo3": ({}, "exact", ""),
    "smollm3": ({}, "exact", ""),
    "glm4": ({}, "exact", ""),
    "gpt_oss": ({}, "exact", ""),
    "llama4_text": ({}, "exact", ""),
    "deepseek_v3": ({}, "exact", ""),
    "bert": ({}, "exact", ""),  # an encoder run as a decoder (is_decoder)
    "gemma3": (dict(final_logit_softcapping=2.5), "exact", ""),  # declared: multimodal, ignores that cap
    "vaultgemma": (dict(final_logit_softcapping=2.5), "exact", ""),  # soft cap read from the config
    "cohere2": (dict(logit_scale=0.5), "exact", ""),  # scale read from the config
    "granitemoe": (dict(logits_scaling=4.0), "exact", ""),
    "minicpm3": ({}, "exact", ""),  # declared: its logits_scaling divides the head's input, not its output
    "bart": ({}, "refused", "failed on the head's output before its loss_function ran"),  # its own loss
    "dory": ({}, "refused", "the head is a transformers.models.dory"),  # not a linear head
    "prophetnet": ({}, "refused", r"head sees positions of shape \(2, 2, 8\)"),  # n-gram streams
}
#: The families of SAMPLE whose post-processing is declared (the config alone would mislead).
DECLARED = {"gemma3", "minicpm3"}


@pytest.mark.parametrize("model_type", sorted(SAMPLE))
def test_family_is_exact_or_refused_by_name(model_type):
    overrides, verdict, reason = SAMPLE[model_type]
    assert (model_type in _families.FAMILIES) == (model_type in DECLARED)
    got, why = outcome(model_type, **overrides)
    assert got == verdict, why
    assert re.search(reason, why), why


def test_the_sample_is_in_the_installed_mapping():
    assert set(SAMPLE) <= set(families())


@pytest.mark.skipif(not os.environ.get("CROSSENT_ALL_FAMILIES"), reason="set CROSSENT_ALL_FAMILIES=1")
@pytest.mark.parametrize("model_type", sorted(families()) if os.environ.get("CROSSENT_ALL_FAMILIES") else [])
def test_every_family_is_exact_or_refused(model_type):
    verdict, reason = outcome(model_type)
    if verdict == "not built":
        pytest.skip(reason)
    assert verdict in ("exact", "refused"), reason
