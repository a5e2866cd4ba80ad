"""Child names, labels and owner references."""

import pytest

from fmforge.api.v1alpha1 import KINDS, MAX_NAME_LENGTH
from fmforge.kube.names import child_name, child_name_for, labels, owner_reference


def test_child_names_are_deterministic():
    assert child_name_for("TrainingRun", "pydocs-gpt", 1) == "pydocs-gpt-g1-train"
    assert child_name_for("DataPile", "pydocs", 12) == "pydocs-g12-prepare"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_longest_name_fits_a_dns_label(kind):
    assert len(child_name_for(kind, "a" * MAX_NAME_LENGTH, 999999)) <= 63


def test_over_long_child_name_is_refused():
    with pytest.raises(ValueError, match="over the DNS label limit"):
        child_name("a" * 60, 1, "prepare")


def test_labels_and_owner_reference():
    assert labels("DataPile", "pydocs", 3)["fmforge.io/generation"] == "3"
    ref = owner_reference({"kind": "DataPile", "metadata": {"name": "p", "uid": "u-1"}})
    assert ref == {"apiVersion": "fmforge.io/v1alpha1", "kind": "DataPile", "name": "p", "uid": "u-1",
                   "controller": True, "blockOwnerDeletion": True}
