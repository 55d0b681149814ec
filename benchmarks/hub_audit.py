"""The pre-flight hub audit's cost for the paper's grid, measured against the loopback hub.

Publishes, on the loopback hub of the tests (tests/hub_server.py), the repos of
``config/config.yaml`` (Pythia deduped 70m, 160m, 410m, 1.4b, 2.8b; 27 step branches each and
``main``) whose ``model.safetensors`` are *virtual* files of the real sizes (parameters x 2
bytes: nothing is stored, the audit never reads them), runs the audit through the real
``huggingface_hub`` client (:func:`lmdynamics.hub_audit.audit`) and reports the
requests it made, its wall time, and the time per request; ``--latency`` scales the request
count to a hub that answers each metadata request in that many seconds, ``CONCURRENCY`` at a
time. Also checks that no weight byte was requested.

    python benchmarks/hub_audit.py [--repeat 3] [--latency 0.3]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from lmdynamics import hub_audit  # noqa: E402
from lmdynamics.plan import shape_parameters  # noqa: E402
from lmdynamics.sources.suites import load_suite  # noqa: E402
from support.hub_server import HubServer, VirtualFile  # noqa: E402


def publish(hub: HubServer, config: dict) -> None:
    """The grid's repos with virtual weights of the real sizes (and a small config.json)."""
    suite = load_suite("pythia-deduped")
    for size in config["sizes"]:
        repo = config["hub"]["repo"].format(size=size)
        weight_bytes = 2 * shape_parameters("gpt_neox", suite.sizes[size])
        for step in [*config["steps"], "main"]:
            name = "main" if step == "main" else f"step{step}"
            sha = hashlib.sha256(f"{repo}@{name}".encode()).hexdigest()
            hub.add_model(repo, name, {
                "config.json": b'{"model_type": "gpt_neox"}\n',
                "model.safetensors": VirtualFile(weight_bytes, lambda o, n: b"\0" * n, sha)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.3,
                        help="seconds per metadata request of the real hub, for the estimate")
    args = parser.parse_args()
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    from huggingface_hub import constants

    times, requests = [], 0
    with HubServer() as hub, tempfile.TemporaryDirectory() as home:
        constants.ENDPOINT = hub.url
        constants.HF_HUB_CACHE = os.path.join(home, "hub")
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        publish(hub, config)
        for _ in range(args.repeat):
            hub.state.requests.clear()
            t0 = time.perf_counter()
            result = hub_audit.audit(config)
            times.append(time.perf_counter() - t0)
            requests = result.requests
            weights = [p for m, p, _, _ in hub.state.requests
                       if m == "GET" and p.endswith(".safetensors")]
            assert not weights, weights
    revisions = len(config["sizes"]) * (len(config["steps"]) + 1)
    wall = statistics.median(times)
    print(f"paper grid: {len(config['sizes'])} sizes x {len(config['steps'])} steps + main = "
          f"{revisions} revisions")
    print(f"requests: {requests} (model_info with files_metadata, one per revision); weight "
          "bytes requested: 0")
    print(f"loopback wall time: median {wall:.2f} s of {args.repeat} "
          f"({', '.join(f'{t:.2f}' for t in times)}), {1000 * wall / requests:.1f} ms per "
          f"request with {hub_audit.CONCURRENCY} in flight")
    estimate = math.ceil(requests / hub_audit.CONCURRENCY) * args.latency
    print(f"scaled: {requests} requests x {args.latency:g} s / {hub_audit.CONCURRENCY} in flight "
          f"= {estimate:.0f} s against a hub answering in {args.latency:g} s per request")


if __name__ == "__main__":
    main()
