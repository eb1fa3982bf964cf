"""docs/ray-service.yaml (the KubeRay RayService) and the Serve config CI deploys from it.

CI runs the RayService's own application `args`, changed only where a 2-core CPU runner must differ
(`CI_CHANGES`, and `CI_DROPPED`, which the tiny model does not need); tests/test_serving_cluster.py
checks that nothing else differs, tests/test_serving_ray_scaling.py deploys it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

RAY_SERVICE = Path(__file__).resolve().parents[1] / "docs" / "ray-service.yaml"

CI_DROPPED = ("model", "engine_dir")  # the tiny random model, made in each process
CI_CHANGES = {
    "tiny": True,
    "device": "cpu",
    "size": "256x256",
    "cpus_per_replica": 0.5,  # 2 replicas x 2 ranks on Ray's 2 CPUs
    "autoscale": "1,2",
    "upscale_delay": 1,
    "downscale_delay": 4,
    "autoscale_look_back": 2,
    # api_key_file: a key file of the test's own (see ci_args)
}


def ray_service() -> dict:
    return yaml.safe_load(RAY_SERVICE.read_text())


def serve_config() -> dict:
    """The RayService's Serve config (its `serveConfigV2`, a YAML document in a string)."""
    return yaml.safe_load(ray_service()["spec"]["serveConfigV2"])


def application() -> dict:
    (app,) = serve_config()["applications"]
    return app


def ci_args(api_key_file) -> dict:
    """The application's `args` as CI deploys them."""
    args = {key: value for key, value in application()["args"].items() if key not in CI_DROPPED}
    return {**args, **CI_CHANGES, "api_key_file": str(api_key_file)}
