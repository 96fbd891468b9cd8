"""Inputs shared by the Kubernetes tests (a plain module: the test folders are not packages)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "k8s" / "base"
EXAMPLES = sorted((REPO / "k8s" / "examples").glob("qwen2-vl-*.yaml"))
# The oldest Kubernetes the manifests are checked against (kubernetes-validate ships its schemas).
K8S_VERSION = "1.30.0"
