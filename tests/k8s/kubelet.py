"""A stand-in kubelet for the API stand-in: the pods of one namespace run as real local processes.

The operator's in-place recovery is only tested for real with ranks that train, die and are replaced, so this
runs each pod the way a kubelet would, from what the API server holds, and writes back what a kubelet writes:

- A new pod (Pending, on no node yet, not being deleted) is "scheduled" on `node_name` and started: its first
  container's command (`python` is this interpreter; the trainer image's code is this checkout, installed in
  the venv), its env (values; `valueFrom.fieldRef` for status.podIP, spec.nodeName, metadata.name and
  metadata.namespace; `envFrom` Secrets, base64-decoded as the kubelet does), its working directory and
  volumes: a ConfigMap volume is a folder holding the map's keys as files, an emptyDir an empty folder. Mount
  paths are replaced by those folders in the command, the env and the working directory (no mount namespace
  here).
- Networking as a pod sees it: each pod gets its own loopback address (127.a.b.N, one /24 per kubelet, so
  tests in parallel do not meet), and 0.0.0.0 in its command or env is that address (inside its network
  namespace a pod's wildcard is its own IP; two pods can then listen on the same port). A Service's DNS name
  (`<service>.<namespace>.svc[.cluster.local]`) resolves to the address of a pod its selector matches.
- Status: Running with the pod IP when started; when the process ends, Failed or Succeeded with the
  container's exit code (a signal: 128 + its number, as a container runtime reports it), and the pod's log
  (its stdout and stderr) is the log subresource.
- A pod deleted (gone from the server: the stand-in deletes at once) has its process group killed.

What it does not: scheduling decisions, restarts (every pod here is restartPolicy Never), probes, resources.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from apiserver import FakeApiServer


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Running:
    uid: str
    proc: subprocess.Popen
    log: Path
    ip: str
    reported: bool = False


class LocalKubelet:
    def __init__(
        self,
        api: FakeApiServer,
        root: Path,
        *,
        namespace: str,
        node_name: str = "worker-0",
        env: dict[str, str] | None = None,
        poll_seconds: float = 0.1,
    ):
        """`env`: the machine's own environment for every container (PATH and the like), under the pod's."""
        self.api = api
        self.root = Path(root)
        self.namespace = namespace
        self.node_name = node_name
        self.base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **(env or {})}
        self.poll_seconds = poll_seconds
        self._net = f"127.{random.randint(1, 250)}.{random.randint(1, 250)}"
        self._next_ip = 10
        self.running: dict[str, _Running] = {}
        self.started: list[str] = []  # pod names in the order they were started
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self.errors: list[str] = []

    # ------------------------------------------------------------------------------------------- control

    def start(self) -> LocalKubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            for run in self.running.values():
                self._kill_group(run.proc)

    def kill_worker(self, pod: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the pod's rank process (its torchrun's child); its pid."""
        with self._lock:
            run = self.running[pod]
        for child in psutil.Process(run.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "LOCAL_RANK" in child.environ() and "torch.distributed.run" not in child.cmdline():
                    child.send_signal(sig)
                    return child.pid
        raise AssertionError(f"pod {pod}: no rank process found")

    def kill_container(self, pod: str) -> None:
        """SIGKILL the pod's whole container (its process group), as an OOM kill or a crashed node would."""
        with self._lock:
            run = self.running[pod]
        os.killpg(run.proc.pid, signal.SIGKILL)

    def pod_dir(self, pod: str) -> Path:
        return self.root / pod

    # ------------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as err:  # noqa: BLE001 - a stand-in must say what broke, not die silently
                self.errors.append(f"{type(err).__name__}: {err}")
            self._stop.wait(self.poll_seconds)

    def _sync(self) -> None:
        pods = {p["metadata"]["name"]: p for p in self.api.objects("pods", self.namespace)}
        with self._lock:
            for name, run in list(self.running.items()):
                pod = pods.get(name)
                if (
                    pod is None
                    or pod["metadata"]["uid"] != run.uid
                    or pod["metadata"].get("deletionTimestamp")
                ):
                    self._kill_group(run.proc)
                    del self.running[name]
                elif not run.reported and run.proc.poll() is not None:
                    self._report_exit(name, run)
            for name, pod in pods.items():
                pending = (pod.get("status") or {}).get("phase") in (None, "Pending")
                if name in self.running or not pending or pod["spec"].get("nodeName"):
                    continue  # ours already, or ended, or another kubelet's (a test's set_pod_status)
                if pod["metadata"].get("deletionTimestamp"):
                    continue
                self.running[name] = self._start(pod, pods)
                self.started.append(name)

    # ------------------------------------------------------------------------------------------- a pod

    def _start(self, pod: dict[str, Any], pods: dict[str, dict[str, Any]]) -> _Running:
        name = pod["metadata"]["name"]
        ip = f"{self._net}.{self._next_ip}"
        self._next_ip += 1
        folder = self.pod_dir(name)
        mounts = self._volumes(pod, folder, ip)
        container = pod["spec"]["containers"][0]

        def local(text: str) -> str:
            for path in sorted(mounts, key=len, reverse=True):
                text = re.sub(rf"(?<![\w/]){re.escape(path)}(?=/|$|\s)", mounts[path], text)
            text = text.replace("0.0.0.0", ip)
            return self._resolve_services(text, pods)

        env = dict(self.base_env)
        env["HOME"] = str(folder)
        for source in container.get("envFrom") or []:
            if ref := source.get("secretRef"):
                secret = self.api.get("secrets", self.namespace, ref["name"]) or {}
                for key, value in (secret.get("data") or {}).items():
                    env[key] = base64.b64decode(value).decode()
        fields = {
            "status.podIP": ip,
            "spec.nodeName": self.node_name,
            "metadata.name": name,
            "metadata.namespace": self.namespace,
        }
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = local(str(var["value"]))
            elif ref := (var.get("valueFrom") or {}).get("fieldRef"):
                env[var["name"]] = fields[ref["fieldPath"]]
        argv = [local(a) for a in container["command"] + list(container.get("args") or [])]
        if argv[0] == "python":
            argv[0] = sys.executable
        workdir = local(container.get("workingDir") or str(folder))
        Path(workdir).mkdir(parents=True, exist_ok=True)
        log = folder / "container.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def running(p: dict[str, Any]) -> None:
            p["spec"]["nodeName"] = self.node_name
            p["status"] = {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": _now(),
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": _now()}},
                    }
                ],
            }

        self.api.modify("pods", self.namespace, name, running)
        return _Running(uid=pod["metadata"]["uid"], proc=proc, log=log, ip=ip)

    def _volumes(self, pod: dict[str, Any], folder: Path, ip: str) -> dict[str, str]:
        """mountPath -> local folder, each volume made as the kubelet would (a ConfigMap's 0.0.0.0 is the pod's
        address too: the trainer's configuration names where it listens)."""
        folders: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            path = folder / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if ref := volume.get("configMap"):
                config = self.api.get("configmaps", self.namespace, ref["name"]) or {}
                for key, text in (config.get("data") or {}).items():
                    (path / key).write_text(text.replace("0.0.0.0", ip))
            folders[volume["name"]] = path
        return {
            m["mountPath"]: str(folders[m["name"]])
            for m in pod["spec"]["containers"][0].get("volumeMounts") or []
            if m["name"] in folders
        }

    def _resolve_services(self, text: str, pods: dict[str, dict[str, Any]]) -> str:
        def address(match: re.Match) -> str:
            service = self.api.get("services", match.group(2), match.group(1))
            selector = ((service or {}).get("spec") or {}).get("selector") or {}
            for other, run in self.running.items():
                labels = (pods.get(other) or {}).get("metadata", {}).get("labels") or {}
                if selector and all(labels.get(k) == v for k, v in selector.items()):
                    return run.ip
            return match.group(0)  # nothing behind it yet: unresolvable, as DNS would answer

        return re.sub(r"\b([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?\b", address, text)

    def _report_exit(self, name: str, run: _Running) -> None:
        code = run.proc.returncode
        exit_code = 128 - code if code < 0 else code  # a signal, as container runtimes report it

        def ended(p: dict[str, Any]) -> None:
            status = p.setdefault("status", {})
            status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            for c in status.get("containerStatuses") or []:
                c["ready"] = False
                c["state"] = {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": "Completed" if exit_code == 0 else "Error",
                        "finishedAt": _now(),
                    }
                }

        self.api.set_pod_log(self.namespace, name, run.log.read_text(errors="replace"))
        with contextlib.suppress(KeyError):  # deleted meanwhile
            self.api.modify("pods", self.namespace, name, ended)
        run.reported = True

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        # torchrun's workers are in its session: the group kill reached them too.
