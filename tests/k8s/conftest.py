"""The example TrainingJobs as a fixture."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from k8s_cases import EXAMPLES


@pytest.fixture(params=EXAMPLES, ids=lambda p: p.stem)
def example(request) -> dict[str, Any]:
    """One example TrainingJob object, as `kubectl apply` would send it."""
    return yaml.safe_load(request.param.read_text())
