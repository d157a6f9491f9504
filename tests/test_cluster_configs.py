"""Cluster files (cluster/) checked with the real parsers and validators that consume them.

* Launcher YAMLs: Ray's own ``prepare_config`` + ``validate_config`` (the ray-schema.json shipped
  in the installed ray), exactly what ``ray up`` runs before it talks to a cloud.
* KubeRay manifests: the fields the ray.io/v1 CRD requires (encoded below from KubeRay's
  ``raycluster_types.go`` / ``rayjob_types.go``: no schema ships in a PyPI package), then Ray's
  own KubeRay translation (``_derive_autoscaling_config_from_ray_cr``, what the in-tree
  autoscaler sidecar runs on the CR) to see the resources each worker group advertises.
* runtime_env.yaml: Ray's job CLI merge (``parse_runtime_env_args``), ``RuntimeEnv`` validation and
  Ray's own working_dir packager with the file's excludes.
* Dockerfile / constraints: read, since there is no Docker engine here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from twinflow import ray_resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
TWINFLOW_RESOURCES = {ray_resources.TRAIN, ray_resources.EVAL, ray_resources.DATA}
IMAGE_TAG = "0.1.0-ray2.60.0-torch2.13.0-cu128"


def _local_autoscaling():
    path = CLUSTER / "local_autoscaling.py"
    spec = importlib.util.spec_from_file_location("twinflow_cluster_local_autoscaling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _yaml(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _role(resources: dict) -> str | None:
    """Which twinflow_* resource a node type advertises (at most one, by the contract)."""
    found = TWINFLOW_RESOURCES & set(resources)
    assert len(found) <= 1, f"a node type advertises several twinflow resources: {sorted(found)}"
    return next(iter(found), None)


def _check_contract(node_types: dict[str, dict], head: str, where: str) -> dict[str, str]:
    """The platform's resource convention, for any mapping node type -> {resources: ...}.
    Returns {role resource: node type}."""
    head_res = node_types[head]["resources"]
    assert _role(head_res) is None and not head_res.get("GPU"), f"{where}: the head must be CPU-only, got {head_res}"
    roles = {}
    for name, spec in node_types.items():
        if name == head:
            continue
        res = spec["resources"]
        role = _role(res)
        assert role is not None, f"{where}: worker type {name} advertises none of {sorted(TWINFLOW_RESOURCES)}"
        assert role not in roles, f"{where}: both {roles.get(role)} and {name} advertise {role}"
        roles[role] = name
        if role in (ray_resources.TRAIN, ray_resources.EVAL):
            ok = res.get("GPU", 0) >= 1 and res[role] == res["GPU"]
            assert ok, f"{where}: {name} needs one {role} per GPU: {res}"
        else:
            assert not res.get("GPU") and res[role] == res["CPU"], f"{where}: {name} needs one {role} per CPU: {res}"
    assert set(roles) == TWINFLOW_RESOURCES, f"{where}: missing node types for {TWINFLOW_RESOURCES - set(roles)}"
    return roles


# --------------------------------------------------------------------------- launcher YAMLs
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_own_schema_validation(name):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(name)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` builds from it
    validate_config(prepared)
    assert prepared["provider"]["type"] == name.split(".")[0]


def test_schema_validation_catches_a_broken_node_type():
    """The validation above has teeth: a fractional resource is refused by Ray's schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml("aws.yaml")
    raw["available_node_types"]["gpu_train"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_node_types_advertise_the_platform_resources(name):
    cfg = _yaml(name)
    types = cfg["available_node_types"]
    roles = _check_contract(types, cfg["head_node_type"], name)
    train = types[roles[ray_resources.TRAIN]]
    assert train["resources"]["GPU"] == 8, "training nodes are 8-GPU machines"
    for worker in (n for n in types if n != cfg["head_node_type"]):
        assert types[worker]["min_workers"] == 0, f"{name}: {worker} must scale from zero"
        assert types[worker]["max_workers"] >= 1
    assert sum(types[w]["max_workers"] for w in roles.values()) == cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30 and cfg["upscaling_speed"] > 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_workers_are_spot_and_storage_comes_from_instance_identity(name):
    cfg = _yaml(name)
    head = cfg["head_node_type"]
    for node_type, spec in cfg["available_node_types"].items():
        nc = spec["node_config"]
        if name == "aws.yaml":
            assert "IamInstanceProfile" in nc, f"{node_type}: S3 access comes from an instance profile"
            spot = nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        else:
            if node_type != head:  # the launcher gives the head its own service account
                assert nc["serviceAccounts"][0]["email"].endswith(".iam.gserviceaccount.com")
            spot = nc.get("scheduling", {}).get("provisioningModel") == "SPOT"
            if spec["resources"].get("GPU"):
                assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE", "GPU VMs cannot live-migrate"
        assert spot == (node_type != head), f"{name}: {node_type} spot={spot}; workers spot, head on-demand"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_uses_the_pinned_image_and_token_auth(name):
    cfg = _yaml(name)
    assert cfg["docker"]["image"].endswith(":" + IMAGE_TAG)
    assert cfg["docker"]["pull_before_run"] is True
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    excluded = " ".join(cfg["rsync_exclude"])
    assert ".venv" in excluded and "runs" in excluded and ".git" in excluded


def test_aws_and_gcp_offer_the_same_node_types_to_the_autoscaler():
    la = _local_autoscaling()
    derived = {n: la.derive_fake_node_types(la.load_launcher_config(CLUSTER / n)) for n in LAUNCHERS}
    assert derived["aws.yaml"] == derived["gcp.yaml"]


def test_no_credentials_in_cluster_files():
    pattern = re.compile(
        r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|BEGIN [A-Z ]*PRIVATE KEY|\"private_key\"|"
        r"AWS_SECRET|secretKey|access_key\s*[:=]",
        re.IGNORECASE,
    )
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix != ".pyc":
            hits = pattern.findall(path.read_text(errors="replace"))
            assert not hits, f"{path.relative_to(ROOT)} looks like it holds credentials: {hits}"


# --------------------------------------------------------------------------- KubeRay
# Required by the ray.io/v1 CRD (fields whose json tag has no omitempty/+optional in KubeRay's
# apis/ray/v1), plus what the pod template needs for a Ray container to start at all.
CRD_REQUIRED = {
    "RayCluster.spec": ["headGroupSpec"],
    "HeadGroupSpec": ["template"],
    "WorkerGroupSpec": ["groupName", "template", "minReplicas", "maxReplicas"],
    "PodTemplateSpec.spec": ["containers"],
    "Container": ["name", "image"],
    "RayJob.spec": ["entrypoint", "rayClusterSpec"],
}
CRD_ENUMS = {
    "upscalingMode": {"Default", "Aggressive", "Conservative"},
    "autoscalerVersion": {"v1", "v2"},
    "authMode": {"disabled", "token"},
    "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"},
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _require(obj: dict, kind: str, where: str) -> None:
    missing = [f for f in CRD_REQUIRED[kind] if f not in obj or obj[f] in (None, "", [])]
    assert not missing, f"{where}: {kind} lacks required {missing}"


def _check_string_map(m: dict | None, where: str) -> None:
    # map[string]string in the CRD: an unquoted YAML number is rejected by the API server.
    for k, v in (m or {}).items():
        assert isinstance(k, str) and isinstance(v, str), f"{where}: {k}: {v!r} must be a quoted string"


def _check_group(group: dict, where: str, head: bool) -> None:
    _require(group, "HeadGroupSpec" if head else "WorkerGroupSpec", where)
    _check_string_map(group.get("rayStartParams"), f"{where}.rayStartParams")
    _check_string_map(group.get("resources"), f"{where}.resources")
    _require(group["template"]["spec"], "PodTemplateSpec.spec", f"{where}.template.spec")
    for c in group["template"]["spec"]["containers"]:
        _require(c, "Container", f"{where}.container")
        assert c["image"].endswith(":" + IMAGE_TAG), f"{where}: image {c['image']} is not the pinned one"
        lim, req = c["resources"]["limits"], c["resources"]["requests"]
        assert lim == req, f"{where}: requests != limits; Ray sizes itself from the limits"
    if not head:
        assert DNS_LABEL.match(group["groupName"]), f"{where}: groupName must be a DNS label"
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def _check_raycluster_spec(spec: dict, where: str) -> None:
    _require(spec, "RayCluster.spec", where)
    assert spec["enableInTreeAutoscaling"] is True
    opts = spec["autoscalerOptions"]
    assert opts["upscalingMode"] in CRD_ENUMS["upscalingMode"]
    assert opts.get("version", "v2") in CRD_ENUMS["autoscalerVersion"]
    assert isinstance(opts["idleTimeoutSeconds"], int) and opts["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] in CRD_ENUMS["authMode"]
    _check_group(spec["headGroupSpec"], f"{where}.headGroupSpec", head=True)
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for g in spec["workerGroupSpecs"]:
        _check_group(g, f"{where}.workerGroupSpecs[{g['groupName']}]", head=False)
        assert g["minReplicas"] == 0, f"{g['groupName']} must scale from zero"


def _autoscaler_view(spec: dict) -> dict:
    """What Ray's in-tree autoscaler makes of a RayCluster spec (it validates the result too)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "twinflow", "namespace": "default"}}
    return _derive_autoscaling_config_from_ray_cr({**cr, "spec": copy.deepcopy(spec)})


def test_raycluster_has_the_fields_kuberay_requires():
    rc = _yaml("kuberay/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    _check_raycluster_spec(rc["spec"], "raycluster")


def test_raycluster_groups_advertise_the_platform_resources_to_rays_autoscaler():
    view = _autoscaler_view(_yaml("kuberay/raycluster.yaml")["spec"])
    types = view["available_node_types"]
    roles = _check_contract(types, view["head_node_type"], "raycluster (as the Ray autoscaler sees it)")
    assert types[roles[ray_resources.TRAIN]]["resources"]["GPU"] == 8
    assert view["idle_timeout_minutes"] == 10
    # The same roles scale the same way as on the launcher clusters.
    aws = _yaml("aws.yaml")["available_node_types"]
    for role, group in roles.items():
        aws_type = next(t for t in aws.values() if role in t["resources"])
        assert types[group]["resources"].get("GPU") == aws_type["resources"].get("GPU"), role
        assert types[group]["min_workers"] == 0 and types[group]["max_workers"] == aws_type["max_workers"], role


def test_kuberay_check_catches_a_group_without_custom_resources():
    spec = _yaml("kuberay/raycluster.yaml")["spec"]
    del spec["workerGroupSpecs"][0]["resources"]
    view = _autoscaler_view(spec)
    with pytest.raises(AssertionError, match="advertises none"):
        _check_contract(view["available_node_types"], view["head_node_type"], "broken")


def test_rayjob_runs_the_lora_training_and_shuts_down(tmp_path):
    from ray.runtime_env import RuntimeEnv

    job = _yaml("kuberay/rayjob_train.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    _require(spec, "RayJob.spec", "rayjob")
    assert spec["entrypoint"] == "python jobs/train_qwen.py --config jobs/configs/qwen_image_lora.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] in CRD_ENUMS["submissionMode"]
    # One cluster shape for both manifests: the RayJob's cluster is the RayCluster's spec.
    assert spec["rayClusterSpec"] == _yaml("kuberay/raycluster.yaml")["spec"]
    _check_raycluster_spec(spec["rayClusterSpec"], "rayjob.rayClusterSpec")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/twinflow"  # where the Dockerfile puts the code
    # Ray's own validation of the fields; it insists that a local working_dir exists, which the
    # image's /home/ray/twinflow does in the submitter pod, and tmp_path does here.
    RuntimeEnv(**{**env, "working_dir": str(tmp_path)})


def test_serviceaccount_binds_cloud_identities_without_keys():
    sa = _yaml("kuberay/serviceaccount.yaml")
    assert sa["kind"] == "ServiceAccount"
    rc = _yaml("kuberay/raycluster.yaml")["spec"]
    groups = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    assert {g["template"]["spec"]["serviceAccountName"] for g in groups} == {sa["metadata"]["name"]}
    assert set(sa["metadata"]["annotations"]) == {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"}


# --------------------------------------------------------------------------- runtime env
def _zip_names(directory: Path, target: Path, excludes: list[str], include_parent_dir=False) -> list[str]:
    from ray._private.runtime_env.packaging import create_package

    create_package(
        str(directory), target, include_gitignore=True, include_parent_dir=include_parent_dir, excludes=excludes
    )
    with zipfile.ZipFile(target) as z:
        return z.namelist()


def test_runtime_env_keeps_the_working_dir_small(tmp_path):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # A checkout as a user has it: code, plus a virtualenv, run outputs and git data.
    repo = tmp_path / "repo"
    for rel, size in {
        "jobs/train_qwen.py": 10,
        "jobs/configs/qwen_image_lora.yaml": 10,
        "evals/__init__.py": 1,
        "platform/twinflow/__init__.py": 1,
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so": 1 << 20,
        "runs/lora/checkpoint_000001/adapter.safetensors": 1 << 20,
        ".git/objects/ab/cdef": 1 << 16,
        "jobs/__pycache__/train_qwen.cpython-311.pyc": 100,
    }.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(b"x" * size)

    # What `ray job submit --working-dir <repo> --runtime-env cluster/runtime_env.yaml` sends.
    env = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"), working_dir=str(repo))
    RuntimeEnv(**env)
    assert env["working_dir"] == str(repo) and env["py_modules"] == ["platform/twinflow"]
    names = _zip_names(repo, tmp_path / "wd.zip", env["excludes"])
    for code in ("jobs/train_qwen.py", "jobs/configs/qwen_image_lora.yaml", "evals/__init__.py"):
        assert code in names
    leaked = [n for n in names if n.startswith((".venv", "runs", ".git")) or "__pycache__" in n]
    assert not leaked, f"working_dir upload would carry {leaked}"

    modules = _zip_names(repo / "platform/twinflow", tmp_path / "mod.zip", env["excludes"], include_parent_dir=True)
    assert "twinflow/__init__.py" in modules


def test_runtime_env_excludes_hold_for_this_checkout(tmp_path):
    """The real repository (with .venv/ and runs/ when present) packs to a small upload."""
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    names = _zip_names(ROOT, tmp_path / "repo.zip", env["excludes"])
    assert "cluster/aws.yaml" in names
    assert not [n for n in names if n.startswith((".venv/", "runs/", ".git/"))]
    assert (tmp_path / "repo.zip").stat().st_size < 20 * 1024 * 1024


# --------------------------------------------------------------------------- image
def test_dockerfile_installs_cuda_torch_first_then_the_project_in_one_command():
    text = (CLUSTER / "docker/Dockerfile").read_text()
    runs = [r for r in re.split(r"\n(?=RUN |COPY |FROM |ARG |ENV |WORKDIR )", text) if r.startswith("RUN ")]
    pip_runs = [r for r in runs if "pip install" in r]
    assert len(pip_runs) == 2, "exactly two installs: torch alone, then everything else"
    torch_run, project_run = pip_runs
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in torch_run
    assert "DS_BUILD_OPS=0 pip install -c /tmp/constraints.txt . " in project_run and "pip check" in project_run
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    assert args["TORCH_VERSION"] == "2.13.0"
    cuda = args["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    assert args["RAY_IMAGE"] == f"rayproject/ray:2.60.0-py311-{cuda}", "base CUDA must match torch's CUDA build"
    assert IMAGE_TAG == f"0.1.0-ray2.60.0-torch{args['TORCH_VERSION']}-{cuda}"
    for src in re.findall(r"^COPY --chown=\S+ (\S+) ", text, re.MULTILINE):
        assert (ROOT / src).exists() or src in ("jobs",), f"Dockerfile copies {src}, which is not in the repository"


def test_image_pins_satisfy_pyproject():
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {Requirement(d).name.lower(): Requirement(d).specifier for d in deps}
    pins = {}
    for line in (CLUSTER / "docker/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt pins exactly: {line}"
            pins[req.name.lower()] = spec.version
    for name in ("torch", "ray", "deepspeed", "diffusers", "transformers", "peft"):
        assert name in pins, f"the image must pin {name}"
    for name, version in pins.items():
        if name in ranges:
            ok = ranges[name].contains(version, prereleases=True)
            assert ok, f"{name}=={version} violates pyproject {ranges[name]}"
    assert pins["torch"] == "2.13.0" and pins["ray"] == "2.60.0"
