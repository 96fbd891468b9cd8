"""One grammar for resource quantities: what the Kubernetes API accepts is accepted at submit for every
backend, and the memory check reads the same bytes from it (issue 11's review: the two parsers disagreed)."""

from __future__ import annotations

import pytest

from controller.memory import MemoryCheckError, check_memory
from controller.quantity import parse_quantity, quantity_bytes
from controller.spec import SpecError, parse_spec

GiB = 1 << 30


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512Gi", 512 * GiB),
        ("1.5Gi", int(1.5 * GiB)),
        (".5Gi", GiB // 2),
        ("+1Gi", GiB),
        ("64G", 64 * 10**9),
        ("1e9", 10**9),
        ("1000", 1000),
        ("500m", 1),  # half a byte rounds up
    ],
)
def test_memory_quantities_in_bytes(text: str, value: int) -> None:
    assert quantity_bytes(text) == value


def test_cpu_quantities_keep_their_fractions() -> None:
    assert parse_quantity("500m") * 1000 == 500
    assert parse_quantity("2") == 2


@pytest.mark.parametrize("text", ["lots", "-1Gi", "1 Gi", "1GB", "", "1.2.3", "Gi"])
def test_what_the_api_would_refuse_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a Kubernetes quantity"):
        parse_quantity(text)


def _spec(**resources) -> dict:
    return {
        "name": "sized",
        "resources": {"nodes": 1, "procs_per_node": 1, **resources},
        "training": {"model": {"name": "mini"}, "data": {"paths": ["d.jsonl"], "rows_per_step": 2}},
    }


def test_a_spec_is_checked_and_sized_with_the_same_grammar() -> None:
    spec = parse_spec(_spec(memory=".5Gi", cpu="1500m"))
    with pytest.raises(MemoryCheckError, match="resources.memory"):  # .5Gi: too small for the mini model
        check_memory(spec)
    assert parse_spec(_spec(memory="1e12")).resources.memory == "1e12"
    with pytest.raises(SpecError, match="resources.memory.*not a Kubernetes quantity"):
        parse_spec(_spec(memory="64GB"))
    with pytest.raises(SpecError, match="resources.cpu.*not a Kubernetes quantity"):
        parse_spec(_spec(cpu="two"))
