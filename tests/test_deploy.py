"""cluster.yaml and deploy/k8s: validated against Ray's, KubeRay's and Kubernetes' own schemas (no cloud, no
cluster), and the nightly watcher script run against a fake kubectl that plays each RayJob state."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "deploy" / "k8s" / "schemas"
MANIFEST = REPO / "deploy" / "k8s" / "rayjob-nightly-refresh.yaml"
KUBERAY_VERSIONS = ["v1.1.0", "v1.7.0"]  # the oldest operator the manifest claims, and a current one


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


# ---- cluster.yaml ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster):
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    bad = {**cluster, "available_node_types": {"head": {"node_config": {}}}}  # no resources: the schema refuses it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_cluster_yaml_gpu_workers_have_a_profile_and_nodes_run_the_image(cluster):
    types = cluster["available_node_types"]
    head, worker = types[cluster["head_node_type"]], types["gpu_worker"]
    # Ray's AWS provider gives its default profile to the head only: the workers need their own for S3
    assert worker["node_config"]["IamInstanceProfile"] == {"Name": "igpt-batch-worker"}
    assert head["node_config"]["IamInstanceProfile"] == {"Name": "igpt-batch-head"}
    install_doc = (REPO / "docs" / "INSTALL.md").read_text()
    for name in ("igpt-batch-worker", "igpt-batch-head"):
        assert name in install_doc  # where the profile and its policy are created
    # a pinned AMI family with a new enough driver, never Ray's stale latest_dlami table
    for t in types.values():
        ami = t["node_config"]["ImageId"]
        assert ami != "latest_dlami" and "base-oss-nvidia-driver-gpu" in ami
    # the project's images, and nothing installed at start: Ray's merged config (defaults filled in) keeps our
    # empty setup lists and the one CUDA check, so no default command of Ray's runs on a node
    from ray.autoscaler._private.docker import validate_docker_config
    from ray.autoscaler._private.util import prepare_config

    validate_docker_config(cluster)
    merged = prepare_config(json.loads(json.dumps(cluster)))
    assert merged["head_setup_commands"] == [] and merged["initialization_commands"] == [] and not merged["file_mounts"]
    (check,) = merged["worker_setup_commands"]
    assert "pip" not in check and "torch.cuda.is_available()" in check
    assert "pip" not in (REPO / "cluster.yaml").read_text().split("head_start_ray_commands")[0].split("docker:")[1]
    assert "RAY_AUTH_MODE=disabled" in " ".join(cluster["head_start_ray_commands"])


def test_install_doc_iam_policies_are_valid_json():
    text = (REPO / "docs" / "INSTALL.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    actions = {a for b in blocks if "Statement" in b for s in b["Statement"] for a in
               ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"} <= actions
    assert {"iam:PassRole", "ssm:GetParameters", "ec2:RunInstances"} <= actions


# ---- deploy/k8s ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs():
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def strict(schema):
    """What `kubectl create` (strict field validation) does with a CRD schema: unknown fields are errors."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


def rayjob_of(docs) -> dict:
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    return yaml.safe_load(cm["data"]["rayjob.yaml"])


@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_rayjob_validates_against_the_kuberay_crd(docs, version):
    # a validator built once (jsonschema.validate would re-check the 200 KB schema itself on every call)
    validator = jsonschema.Draft202012Validator(strict(json.loads((SCHEMAS / f"kuberay-{version}-rayjob-v1.json").read_text())))
    rayjob = rayjob_of(docs)
    validator.validate(rayjob)
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and 60 <= spec["ttlSecondsAfterFinished"] <= 900  # minutes, not a day
    assert spec["activeDeadlineSeconds"] < 24 * 3600
    # the schema really checks: an unknown field and a wrongly typed one are refused
    for bad in ({**spec, "ttlSecondsAfterFinishd": 300}, {**spec, "ttlSecondsAfterFinished": "300"}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate({**rayjob, "spec": bad})


def test_k8s_objects_validate_against_the_kubernetes_schema(docs):
    bundle = json.loads((SCHEMAS / "kubernetes-v1.30.0-strict.json").read_text())
    for doc in docs:
        ref = {"$schema": bundle["$schema"], "$defs": bundle["$defs"], "$ref": f"#/$defs/{bundle['kinds'][doc['kind']]}"}
        jsonschema.Draft202012Validator(ref).validate(doc)
    cron = next(d for d in docs if d["kind"] == "CronJob")
    bad = json.loads(json.dumps(cron))
    bad["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    ref = {"$schema": bundle["$schema"], "$defs": bundle["$defs"], "$ref": "#/$defs/io.k8s.api.batch.v1.CronJob"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(ref).validate(bad)


def test_cronjob_watcher_image_deadlines_and_rbac(docs):
    cron = next(d for d in docs if d["kind"] == "CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    (c,) = job["template"]["spec"]["containers"]
    assert c["image"].startswith("registry.k8s.io/kubectl:v1.") and "bitnami" not in MANIFEST.read_text().split("kind: ServiceAccount")[1]
    assert c["command"] == ["/bin/bash", "/etc/igpt/watch.sh"]  # the image's entrypoint is kubectl itself
    env = {e["name"]: int(e["value"]) for e in c["env"]}
    rayjob_deadline = rayjob_of(docs)["spec"]["activeDeadlineSeconds"]
    # the RayJob's own deadline fires first, then the watcher's, then the Job's, all before the next night
    assert rayjob_deadline < env["WATCH_DEADLINE_SECONDS"] < job["activeDeadlineSeconds"] < 24 * 3600
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    role = next(d for d in docs if d["kind"] == "Role")
    assert {"create", "get", "list", "delete"} <= set(role["rules"][0]["verbs"])
    spec = rayjob_of(docs)["spec"]
    assert "pip" not in yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")  # the image has it all: nothing installed
    assert spec["entrypoint"].startswith("python /home/ray/igpt-batch/jobs/nightly_refresh.py --config /home/ray/")


# ---- the images: Dockerfile (parsed; no registry can be reached to build FROM the Ray image) ----------------

def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(str(REPO / "Dockerfile"))


def stages(parser) -> dict[str, list[dict]]:
    """{target name: its instructions} of a multi-stage Dockerfile."""
    out, name = {}, None
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            name = ins["value"].split()[-1]
            out[name] = [ins]
        elif name is not None and ins["instruction"] != "COMMENT":
            out[name].append(ins)
    return out


def images_named() -> dict[str, set[str]]:
    """{cpu|gpu: every image tag that cluster.yaml and the RayJob name for the head or the workers}."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    spec = rayjob_of([d for d in yaml.safe_load_all(MANIFEST.read_text()) if d])["spec"]["rayClusterSpec"]
    head = [c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]]
    workers = [c["image"] for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    return {"cpu": {cluster["docker"]["head_image"], *head}, "gpu": {cluster["docker"]["worker_image"], *workers}}


def test_dockerfile_builds_from_the_locked_ray_and_installs_from_the_lock():
    pins, parser = locked(), dockerfile()
    targets = stages(parser)
    assert set(targets) == {"cpu", "gpu"}
    assert parser.parent_images == [f"rayproject/ray:{pins['ray']}-py311", f"rayproject/ray:{pins['ray']}-py311-gpu"]
    for name, body in targets.items():
        runs = [i["value"] for i in body if i["instruction"] == "RUN"]
        pips = [cmd for run in runs for cmd in run.split("&&") if "pip install" in cmd]
        project = [c for c in pips if c.split()[-1] == "."]
        assert project and all("-c constraints.txt" in c for c in project), pips  # the project from the lock
        torch_pins = {m for c in pips for m in re.findall(r"torch==([\w.+]+)", c)}
        assert torch_pins == {pins["torch"]}, pips  # the locked torch, nothing else
        assert all("--index-url" in c for c in pips if "-c constraints.txt" not in c)  # only CPU torch skips the lock
        cpu_index = any("download.pytorch.org/whl/cpu" in c for c in pips)
        assert cpu_index == (name == "cpu")  # heads get the CPU wheel, workers PyPI's CUDA build
        copied = {w for i in body if i["instruction"] == "COPY" for w in i["value"].split()[:-1] if not w.startswith("--")}
        assert {"constraints.txt", "pyproject.toml", "igpt_batch", "jobs", "configs"} <= copied
        assert any(f"ray.__version__ == '{pins['ray']}'" in r for r in runs)  # the build itself checks the Ray


def test_deploy_and_cluster_yaml_name_the_dockerfiles_images():
    named = images_named()
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    for target, tags in named.items():
        assert len(tags) == 1, tags  # cluster.yaml and the RayJob name one and the same image
        (tag,) = tags
        assert tag.endswith(f"/igpt-batch:{version}-{target}")
        assert f"docker build --target {target} -t {tag} ." in (REPO / "Dockerfile").read_text()
        assert tag in (REPO / "docs" / "INSTALL.md").read_text()  # and the doc says how to build and push it


# ---- the watcher script, against a fake kubectl ---------------------------------------------------------------

FAKE_KUBECTL = r'''#!/usr/bin/env python3
"""A stand-in kubectl: RayJobs live in $FAKE_STATE (JSON); each `get` of the created job advances its state."""
import json, os, sys
path = os.environ["FAKE_STATE"]
st = json.load(open(path))
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(args) + "\n")
def save():
    json.dump(st, open(path, "w"))
def state(name):
    j = st["jobs"][name]
    return j["states"][0]
if args[0] == "create":
    name = "igpt-nightly-refresh-new"
    st["jobs"][name] = {"states": st.pop("script"), "created": 99}
    save(); print("rayjob.ray.io/" + name); sys.exit(0)
if args[0] == "delete":
    name = args[2] if args[1] == "rayjob" else args[1].split("/")[-1]
    st["jobs"].pop(name); st.setdefault("deleted", []).append(name); save(); sys.exit(0)
if args[0] == "get" and args[1] == "rayjobs":
    jobs = sorted(st["jobs"].items(), key=lambda kv: kv[1]["created"])
    if "-o" in args and args[args.index("-o") + 1] == "name":
        print("\n".join("rayjob.ray.io/" + n for n, _ in jobs)); sys.exit(0)
    print("\n".join(f"{n} {j['states'][0]}" for n, j in jobs)); sys.exit(0)
if args[0] == "get":
    name = args[1].split("/")[-1]
    j = st["jobs"][name]
    s = j["states"][0]
    if len(j["states"]) > 1 and name.endswith("-new"):
        j["states"].pop(0); save()
    if s == "ERROR":
        print("error: the server is currently unable to handle the request", file=sys.stderr); sys.exit(1)
    if "reason" in args[-1]:
        print("DeadlineExceeded: the job ran too long"); sys.exit(0)
    print("" if s == "New" else s, end=""); sys.exit(0)
sys.exit(2)
'''


def run_watcher(tmp_path, docs, script, earlier=None, deadline="3600"):
    """Run watch.sh with a fake kubectl; script: the states the new RayJob goes through, one per poll."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    (tmp_path / "watch.sh").write_text(cm["data"]["watch.sh"])
    (tmp_path / "rayjob.yaml").write_text(cm["data"]["rayjob.yaml"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(stat.S_IRWXU)
    jobs = {name: {"states": [s], "created": i} for i, (name, s) in enumerate((earlier or {}).items())}
    (tmp_path / "state.json").write_text(json.dumps({"jobs": jobs, "script": script}))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": str(tmp_path / "state.json"),
           "FAKE_LOG": str(tmp_path / "log"), "RAYJOB_TEMPLATE": str(tmp_path / "rayjob.yaml"), "POLL_SECONDS": "0",
           "WATCH_DEADLINE_SECONDS": deadline, "KEEP_FINISHED": "3"}
    p = subprocess.run(["bash", str(tmp_path / "watch.sh")], env=env, capture_output=True, text=True, timeout=60)
    st = json.loads((tmp_path / "state.json").read_text())
    return p.returncode, p.stdout + p.stderr, st


@pytest.mark.parametrize("script,rc,says", [
    (["New", "Initializing", "Running", "ERROR", "Running", "Complete"], 0, "complete"),  # an API hiccup is retried
    (["Running", "Failed"], 1, "Failed: DeadlineExceeded"),
    (["ValidationFailed"], 1, "ValidationFailed"),
    (["Running", "Suspending"], 1, "deleting it"),
    (["Initializing", "Suspended"], 1, "deleting it"),
])
def test_watcher_ends_on_every_terminal_state(tmp_path, docs, script, rc, says):
    code, out, st = run_watcher(tmp_path, docs, script)
    assert code == rc and says in out, out
    deleted = st.get("deleted", [])
    assert ("igpt-nightly-refresh-new" in deleted) == script[-1].startswith("Suspend")


def test_watcher_deletes_a_stuck_job_at_its_deadline(tmp_path, docs):
    code, out, st = run_watcher(tmp_path, docs, ["Running"], deadline="0")
    assert code == 1 and "deadline" in out and st["deleted"] == ["igpt-nightly-refresh-new"], out


def test_watcher_stops_an_earlier_unfinished_night_and_prunes_finished_ones(tmp_path, docs):
    earlier = {"n1": "Complete", "n2": "Failed", "n3": "Complete", "n4": "Running", "n5": "ValidationFailed"}
    code, out, st = run_watcher(tmp_path, docs, ["Running", "Complete"], earlier=earlier)
    assert code == 0, out
    # n4 would write the same store: deleted before tonight's job is created
    log = (tmp_path / "log").read_text().splitlines()
    assert log.index("delete rayjob.ray.io/n4 --wait=false") < next(i for i, line in enumerate(log) if line.startswith("create"))
    # of the finished n1, n2, n3, n5 and tonight's, the newest three stay
    assert set(st["jobs"]) == {"n3", "n5", "igpt-nightly-refresh-new"} and set(st["deleted"]) == {"n4", "n1", "n2"}
