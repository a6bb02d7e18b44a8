"""Regenerate the trimmed schemas in this folder (tests/test_deploy.py validates deploy/k8s against them).

    python deploy/k8s/schemas/trim.py kuberay CRD.yaml VERSION       # ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayjobs.yaml at tag VERSION
    python deploy/k8s/schemas/trim.py k8s DEFINITIONS.json VERSION    # kubernetes_validate/kubernetes-json-schema/vVERSION-local-strict/_definitions.json
                                                                      # from the kubernetes-validate wheel (pip download --no-deps kubernetes-validate)
"""
import json
import re
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
K8S_ROOTS = {  # the kinds deploy/k8s/rayjob-nightly-refresh.yaml uses
    "CronJob": "io.k8s.api.batch.v1.CronJob",
    "ConfigMap": "io.k8s.api.core.v1.ConfigMap",
    "ServiceAccount": "io.k8s.api.core.v1.ServiceAccount",
    "Role": "io.k8s.api.rbac.v1.Role",
    "RoleBinding": "io.k8s.api.rbac.v1.RoleBinding",
}


def strip(o):
    """Drop descriptions: they are most of the bytes and nothing validates against them."""
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k != "description"}
    if isinstance(o, list):
        return [strip(x) for x in o]
    return o


def kuberay(crd_path: str, version: str) -> None:
    crd = yaml.safe_load(Path(crd_path).read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    out = {"$comment": f"openAPIV3Schema of ray.io/v1 RayJob from KubeRay {version} "
                       f"(ray-project/kuberay, ray-operator/config/crd/bases/ray.io_rayjobs.yaml), descriptions removed",
           **strip(v1["schema"]["openAPIV3Schema"])}
    (HERE / f"kuberay-{version}-rayjob-v1.json").write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")


def k8s(defs_path: str, version: str) -> None:
    defs = json.loads(Path(defs_path).read_text())["$defs"]
    keep, todo = {}, list(K8S_ROOTS.values())
    while todo:  # the closure of $refs from the kinds we use
        name = todo.pop()
        if name in keep:
            continue
        keep[name] = strip(defs[name])
        todo += re.findall(r'"#/\$defs/([^"]+)"', json.dumps(keep[name]))
    out = {"$comment": f"Kubernetes {version} schemas (strict: unknown fields refused) for {sorted(K8S_ROOTS)}, "
                       "from the kubernetes-validate package (kubernetes-json-schema, generated from Kubernetes' "
                       "OpenAPI spec); only the definitions those kinds reach, descriptions removed",
           "$schema": "https://json-schema.org/draft/2020-12/schema", "kinds": K8S_ROOTS, "$defs": keep}
    (HERE / f"kubernetes-{version}-strict.json").write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    {"kuberay": kuberay, "k8s": k8s}[sys.argv[1]](sys.argv[2], sys.argv[3])
