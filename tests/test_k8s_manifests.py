"""Offline validation of k8s/: render every overlay (kustomize semantics in Python) and check each
object against its schema (KubeRay v1.7.0 CRDs for ray.io, Kubernetes OpenAPI for built-in kinds),
then the promises the manifests make: non-root, no secret values, a head that runs no work,
bounded autoscaling, MLflow Host checking, nothing exposed outside the cluster, and the hardening:
Pod Security `restricted`, read-only root filesystems, default-deny egress with an allow-list,
read-only data for Serve, images pinned to a commit or digest, MLflow behind basic auth."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from mirage.config import load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
OVERLAYS = ["base", "overlays/dev", "overlays/paper"]
K8S_VERSION = "1.32"
RAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
CLUSTER_SCOPED = {"Namespace"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}


# ------------------------------------------------------------------ kustomize


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json_patch(doc: dict, ops: list[dict], where: str) -> dict:
    """RFC 6902 add/replace/remove (the ops the overlays use); a missing path fails loudly."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, leaf = _pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        kind = op["op"]
        if isinstance(node, list):
            idx = len(node) if leaf == "-" else int(leaf)
            if kind == "add":
                node.insert(idx, op["value"])
            elif kind == "replace":
                node[idx] = op["value"]
            elif kind == "remove":
                del node[idx]
            else:
                raise AssertionError(f"{where}: unsupported op {kind}")
        else:
            if kind in ("replace", "remove") and leaf not in node:
                raise AssertionError(f"{where}: {op['path']} does not exist")
            if kind in ("add", "replace"):
                node[leaf] = op["value"]
            elif kind == "remove":
                del node[leaf]
            else:
                raise AssertionError(f"{where}: unsupported op {kind}")
    return doc


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target.get("kind", obj["kind"]) == obj["kind"]
        and target.get("name", obj["metadata"]["name"]) == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def _image_name(image: str) -> str:
    """``registry/name:tag@digest`` -> ``registry/name`` (a registry port is not a tag)."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.split(':', 1)[0]}" if head else tail.split(":", 1)[0]


def _set_images(node, images: list[dict]) -> None:
    """kustomize `images:`: rewrite the image of every container found under `containers` or
    `initContainers`, at any depth (kustomize does the same for custom resources)."""
    if isinstance(node, list):
        for n in node:
            _set_images(n, images)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for c in value:
                for img in images:
                    if "image" in c and _image_name(c["image"]) == img["name"]:
                        name = img.get("newName", img["name"])
                        if "digest" in img:
                            c["image"] = f"{name}@{img['digest']}"
                        elif "newTag" in img:
                            c["image"] = f"{name}:{img['newTag']}"
                        else:
                            c["image"] = name + c["image"][len(_image_name(c["image"])) :]
        _set_images(value, images)


def render(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k directory` creates (resources, namespace, JSON 6902 patches,
    image overrides)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: kustomization keys {unknown} are not rendered by this test"
    objs: list[dict] = []
    for res in kust.get("resources", []):
        path = directory / res
        if path.is_dir():
            objs.extend(render(path))
        else:
            objs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        assert isinstance(ops, list), f"{directory / patch['path']}: expected a JSON 6902 op list"
        hits = [i for i, o in enumerate(objs) if _matches(o, patch["target"])]
        assert len(hits) == 1, f"{directory}: patch target {patch['target']} matched {len(hits)} objects"
        objs[hits[0]] = _json_patch(objs[hits[0]], ops, str(directory / patch["path"]))
    _set_images(objs, kust.get("images", []))
    if "namespace" in kust:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = kust["namespace"]
    return objs


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / request.param)


# --------------------------------------------------------------------- schemas


def _strict(node):
    """CRD structural schema -> JSON schema: int-or-string as anyOf, unknown keys forbidden."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


_CRD_CACHE: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}: ray.io kinds not validated")
    if kind not in _CRD_CACHE:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load((CRD_DIR / f"ray.io_{RAY_KINDS[kind]}.yaml").read_text(), Loader=loader)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}  # checked as ObjectMeta below
        _CRD_CACHE[kind] = schema
    return _CRD_CACHE[kind]


def validate_object(obj: dict) -> None:
    """Raise jsonschema.ValidationError if ``obj`` does not match its kind's schema."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships the Kubernetes schemas")
    if obj["kind"] in RAY_KINDS:
        assert obj["apiVersion"] == "ray.io/v1"
        jsonschema.validate(obj, crd_schema(obj["kind"]), cls=jsonschema.Draft7Validator)
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        kv.validate(meta, K8S_VERSION, strict=True)  # the ObjectMeta part
    else:
        kv.validate(obj, K8S_VERSION, strict=True)


def test_every_object_matches_its_schema(rendered):
    name, objs = rendered
    assert objs, f"{name} renders nothing"
    for obj in objs:
        try:
            validate_object(obj)
        except jsonschema.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.absolute_path)}")


def test_validation_rejects_unknown_keys_and_wrong_types():
    objs = {o["kind"]: o for o in render(K8S / "base")}
    bad_cluster = copy.deepcopy(objs["RayCluster"])
    bad_cluster["spec"]["headGroupSpec"]["rayStartParamz"] = {}
    bad_pod = copy.deepcopy(objs["RayCluster"])
    bad_pod["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolisy"] = "Always"
    bad_replicas = copy.deepcopy(objs["RayCluster"])
    bad_replicas["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    bad_deploy = copy.deepcopy(objs["Deployment"])
    bad_deploy["spec"]["template"]["spec"]["containers"][0]["portz"] = []
    for bad in (bad_cluster, bad_pod, bad_replicas, bad_deploy):
        with pytest.raises(jsonschema.ValidationError):
            validate_object(bad)


def test_int_or_string_fields_accept_both():
    objs = {o["kind"]: o for o in render(K8S / "base")}
    cluster = copy.deepcopy(objs["RayCluster"])
    res = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    res["limits"]["cpu"] = 4
    validate_object(cluster)


# ------------------------------------------------------------ security promises


def _pod_specs(obj: dict) -> list[tuple[str, dict]]:
    spec = obj.get("spec", {})
    kind = obj["kind"]
    if kind == "Deployment":
        return [("template", spec["template"]["spec"])]
    if kind == "RayJob":
        return [("submitter", spec["submitterPodTemplate"]["spec"])]
    cluster = spec["rayClusterConfig"] if kind == "RayService" else spec if kind == "RayCluster" else None
    if cluster is None:
        return []
    out = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def _clusters(objs: list[dict]) -> list[tuple[str, dict]]:
    out = [(o["metadata"]["name"], o["spec"]) for o in objs if o["kind"] == "RayCluster"]
    out += [(o["metadata"]["name"], o["spec"]["rayClusterConfig"]) for o in objs if o["kind"] == "RayService"]
    return out


def test_containers_run_as_non_root_without_privilege(rendered):
    name, objs = rendered
    n_pods = 0
    for obj in objs:
        for where, pod in _pod_specs(obj):
            n_pods += 1
            psc = pod.get("securityContext", {})
            for c in pod["containers"]:
                csc = c.get("securityContext", {})
                label = f"{name}: {obj['kind']}/{obj['metadata']['name']} {where}/{c['name']}"
                assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, label
                assert csc.get("runAsUser", psc.get("runAsUser", 0)) != 0, label
                assert csc.get("allowPrivilegeEscalation") is False, label
                assert "ALL" in csc.get("capabilities", {}).get("drop", []), label
                assert not csc.get("privileged", False), label
            assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
    assert n_pods == 8  # mlflow, RayCluster head + 3 groups, RayJob submitter, RayService head + 1 group
    for cname, cluster in _clusters(objs):
        asc = cluster["autoscalerOptions"]["securityContext"]
        assert asc["runAsNonRoot"] is True and asc["allowPrivilegeEscalation"] is False, cname


SECRETISH = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$|CREDENTIAL|BACKEND_STORE_URI)", re.I)


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    yield path, node


def test_no_secret_values_in_manifests(rendered):
    name, objs = rendered
    assert not [o for o in objs if o["kind"] == "Secret"], f"{name}: Secrets must be created out of band"
    secret_refs = set()
    for obj in objs:
        for path, node in _walk(obj):
            if isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node):
                if SECRETISH.search(node["name"]):
                    assert "value" not in node, f"{name}: {path} ({node['name']}) has a literal value"
                    assert "secretKeyRef" in node["valueFrom"], f"{name}: {path} must come from a Secret"
                    secret_refs.add(node["valueFrom"]["secretKeyRef"]["name"])
            if isinstance(node, str):
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", node), f"{name}: {path} embeds credentials"
    assert {"mlflow-backend", "mlflow-s3", "mlflow-auth", "mlflow-client", "mirage"} <= secret_refs


def test_head_runs_no_work_and_autoscaling_is_bounded(rendered):
    name, objs = rendered
    clusters = _clusters(objs)
    assert len(clusters) == 2
    for cname, cluster in clusters:
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", cname
        head_res = head["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head_res.get("limits", {}), f"{cname}: head must be CPU only"
        assert cluster["enableInTreeAutoscaling"] is True, cname
        assert cluster["authOptions"]["mode"] == "token", cname
        assert cluster["rayVersion"] == "2.60.0", cname
        for g in cluster["workerGroupSpecs"]:
            assert "minReplicas" in g and "maxReplicas" in g, f"{cname}/{g['groupName']}"
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]


def test_extraction_gets_one_80gb_gpu_per_pod(rendered):
    _, objs = rendered
    cluster = next(o for o in objs if o["kind"] == "RayCluster")["spec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {"extract", "train"} <= set(groups)
    for gname in ("extract", "train"):
        pod = groups[gname]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        expr = terms[0]["matchExpressions"][0]
        assert expr["key"] == "nvidia.com/gpu.memory" and expr["operator"] == "Gt"
        assert int(expr["values"][0]) >= 79000


def test_paper_overlay_scales_to_the_paper_config():
    cfg = load_config("paper")
    cluster = next(o for o in render(K8S / "overlays/paper") if o["kind"] == "RayCluster")["spec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert groups["extract"]["maxReplicas"] >= cfg.features.actors
    assert groups["train"]["maxReplicas"] >= cfg.train.num_workers * cfg.sweep.max_concurrent
    dev = next(o for o in render(K8S / "overlays/dev") if o["kind"] == "RayCluster")["spec"]
    assert all(g["maxReplicas"] <= 1 for g in dev["workerGroupSpecs"])


def test_mlflow_server_checks_host_and_uses_postgres_and_s3(rendered):
    name, objs = rendered
    deploy = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "mlflow")
    ns = svc["metadata"]["namespace"]
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    args = dict(a[2:].split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)
    hosts = args["allowed-hosts"].split(",")
    assert "*" not in hosts
    for host in (svc["metadata"]["name"], f"mlflow.{ns}.svc.cluster.local"):
        assert host in hosts and f"{host}:*" in hosts, f"{name}: --allowed-hosts misses {host}"
    assert args["artifacts-destination"].startswith("s3://") and "--serve-artifacts" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-backend"
    assert "MLFLOW_S3_ENDPOINT_URL" in env
    port = svc["spec"]["ports"][0]["port"]
    for obj in objs:
        for path, node in _walk(obj):
            if isinstance(node, str) and "mlflow." in node and "://" in node:
                assert f"mlflow.{ns}.svc.cluster.local:{port}" in node, f"{name}: {path} = {node}"


def test_nothing_is_exposed_outside_the_cluster(rendered):
    name, objs = rendered
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"Ingress", "Route", "Gateway", "HTTPRoute"}, name
    for o in objs:
        if o["kind"] == "Service":
            assert o["spec"].get("type", "ClusterIP") == "ClusterIP", o["metadata"]["name"]
    for cname, cluster in _clusters(objs):
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP", cname
        assert not cluster["headGroupSpec"].get("enableIngress", False), cname
    for o in objs:
        if o["kind"] == "RayService":
            svc = o["spec"].get("serveService", {}).get("spec", {})
            assert svc.get("type", "ClusterIP") == "ClusterIP"


def test_network_policies_admit_only_the_namespace(rendered):
    name, objs = rendered
    pols = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    deny = [p for p in pols.values() if p["podSelector"] == {} and "ingress" not in p]
    assert deny and "Ingress" in deny[0]["policyTypes"], f"{name}: no default-deny ingress policy"
    selected = [p["podSelector"].get("matchLabels", {}) for p in pols.values()]
    assert {"app.kubernetes.io/name": "mlflow"} in selected
    assert {"ray.io/node-type": "head"} in selected or {"ray.io/is-ray-node": "yes"} in selected
    for pname, p in pols.items():
        for rule in p.get("ingress", []):
            for peer in rule.get("from", []):
                assert "ipBlock" not in peer, f"{pname}: ipBlock admits traffic from outside the cluster"
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"].get("matchLabels"), f"{pname}: all namespaces admitted"
            if p["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "mlflow":
                assert rule["from"] == [{"podSelector": {}}], f"{pname}: MLflow admits more than the namespace"


# -------------------------------------------------------------- job and serve


def _set_overrides(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_rayjob_runs_the_paper_sweep_with_valid_overrides(rendered):
    _, objs = rendered
    job = next(o for o in objs if o["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "jobs/sweep.py", "--config", "paper"]
    cfg = load_config(argv[3], _set_overrides(argv))
    assert cfg.tracking.uri.startswith("http://mlflow.") and cfg.data.root.startswith("/mnt/mirage")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert {".git", "outputs", ".venv"} <= set(env["excludes"])
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "mirage"}


def _group_resources(group: dict) -> dict[str, float]:
    """The custom Ray resources a group offers: ``rayStartParams.resources``, a JSON object that KubeRay
    passes to ``ray start --resources=`` through the shell (hence the outer quotes)."""
    raw = group.get("rayStartParams", {}).get("resources")
    if not raw:
        return {}
    (text,) = shlex.split(raw)
    return {k: float(v) for k, v in json.loads(text).items()}


WORK_GROUPS = {"features.resources": "extract", "train.worker_resources": "train", "sweep.driver_resources": "cpu"}
"""Config field of the custom resources a kind of work requests -> the worker group it must land on."""


def resource_mismatches(objs: list[dict]) -> list[str]:
    """Where the RayJob's extraction actors, Train workers or trial drivers would not land on their own worker group:
    a request the group does not offer, offered by another group too, more than one pod offers, or
    none at all (then the work may land anywhere, the head aside); the head offering any."""
    cluster = next(o for o in objs if o["kind"] == "RayCluster")["spec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    offered = {g: _group_resources(spec) for g, spec in groups.items()}
    bad = []
    if _group_resources(cluster["headGroupSpec"]):
        bad.append("the head offers custom resources")
    argv = shlex.split(next(o for o in objs if o["kind"] == "RayJob")["spec"]["entrypoint"])
    flat = load_config(argv[3], _set_overrides(argv)).flat()
    for key, group in WORK_GROUPS.items():
        request = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
        if not request:
            bad.append(f"{key} requests no custom resource")
        for res, amount in request.items():
            owners = sorted(g for g, r in offered.items() if res in r)
            if owners != [group]:
                bad.append(f"{key} requests {res!r}, offered by {owners or 'no group'}; expected the {group} group only")
            elif amount > offered[group][res]:
                bad.append(f"{key} requests {amount:g} {res!r}; one {group} pod offers {offered[group][res]:g}")
    return bad


def test_work_requests_the_custom_resources_of_its_worker_group(rendered):
    name, objs = rendered
    assert resource_mismatches(objs) == [], name
    cluster = next(o for o in objs if o["kind"] == "RayCluster")["spec"]
    for g in cluster["workerGroupSpecs"]:  # one slot per GPU of the pod: one actor or rank per GPU
        gpus = g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        if gpus is not None:
            assert sum(_group_resources(g).values()) == int(gpus), f"{name}: {g['groupName']}"


def test_readme_submit_command_sets_what_the_rayjob_sets(rendered):
    """A sweep submitted by hand as the README says runs as the RayJob does: same config, same groups."""
    from test_job_submit import readme_submit_command

    _, objs = rendered
    readme = readme_submit_command()
    job = shlex.split(next(o for o in objs if o["kind"] == "RayJob")["spec"]["entrypoint"])
    assert readme[readme.index("--") + 1:readme.index("--") + 5] == job[:4]
    assert load_config(job[3], _set_overrides(readme)).to_dict() == load_config(job[3], _set_overrides(job)).to_dict()


def test_resource_check_finds_a_mismatch():
    objs = render(K8S / "base")
    job = next(o for o in objs if o["kind"] == "RayJob")
    cluster = next(o for o in objs if o["kind"] == "RayCluster")["spec"]
    renamed = copy.deepcopy(objs)
    next(o for o in renamed if o["kind"] == "RayJob")["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace(
        "{train_group: 1}", "{training: 1}")
    shared = copy.deepcopy(objs)
    extract = next(g for g in next(o for o in shared if o["kind"] == "RayCluster")["spec"]["workerGroupSpecs"]
                   if g["groupName"] == "extract")
    extract["rayStartParams"]["resources"] = '"{\\"extract_group\\": 1, \\"train_group\\": 1}"'
    too_much = copy.deepcopy(objs)
    next(o for o in too_much if o["kind"] == "RayJob")["spec"]["entrypoint"] += " --set 'features.resources={extract_group: 2}'"
    headed = copy.deepcopy(objs)
    next(o for o in headed if o["kind"] == "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]["resources"] = (
        cluster["workerGroupSpecs"][0]["rayStartParams"]["resources"])
    for bad in (renamed, shared, too_much, headed):
        assert resource_mismatches(bad)


def test_jobs_sweep_entry_exists():
    if not (ROOT / "jobs/sweep.py").is_file():
        pytest.skip("jobs/sweep.py not present in this checkout")
    assert "mirage.cli" in (ROOT / "jobs/sweep.py").read_text()


def test_rayservice_serve_config_builds_a_valid_app_config(rendered):
    _, objs = rendered
    svc = next(o for o in objs if o["kind"] == "RayService")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert serve_cfg["http_options"]["port"] == 8000
    (app,) = serve_cfg["applications"]
    module, _, attr = app["import_path"].partition(":")
    import importlib

    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    args = app["args"]
    assert args["model"].startswith("models:/") and "@" in args["model"]
    cfg = load_config(args["config"], args["overrides"])
    assert cfg.serve.max_replicas >= cfg.serve.replicas


# ------------------------------------------------------------ image and README


def test_dockerfile_uses_ray_gpu_base_and_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and re.fullmatch(r"rayproject/ray:2\.60\.0-py311-gpu", froms[0]), froms
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs"} <= ignored


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_readme_documents_the_kubernetes_commands():
    sec = _readme_section("Run on Kubernetes")
    assert "kubectl apply -k k8s/overlays/dev" in sec
    assert "kubectl apply -k k8s/overlays/paper" in sec
    assert re.search(r"kubectl -n mirage port-forward svc/mirage-head-svc 8265:8265", sec)
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir ." in sec
    assert "-- python jobs/sweep.py --config paper" in sec
    for secret in ("mlflow-backend", "mlflow-s3"):
        assert f"create secret generic {secret}" in sec


# ------------------------------------------------------------------- hardening

RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}
PINNED_IMAGE = re.compile(r".+(@sha256:[0-9a-f]{64}|:[0-9a-f]{7,40})")
SHARED_CLAIM = "mirage-shared"


def _containers(obj: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container a pod of ``obj`` runs, the KubeRay
    autoscaler sidecar of each head included (its settings come from ``autoscalerOptions``)."""
    out = []
    for where, pod in _pod_specs(obj):
        for c in pod.get("initContainers", []) + pod["containers"]:
            out.append((f"{obj['kind']}/{obj['metadata']['name']} {where}/{c['name']}", pod, c))
    for cname, cluster in _clusters([obj]):
        if cluster.get("enableInTreeAutoscaling"):
            opts = cluster["autoscalerOptions"]
            head = cluster["headGroupSpec"]["template"]["spec"]
            sidecar = {"name": "autoscaler", **{k: opts[k] for k in ("securityContext", "volumeMounts") if k in opts}}
            # KubeRay mounts the head's Ray log volume at /tmp/ray in the autoscaler.
            sidecar["volumeMounts"] = sidecar.get("volumeMounts", []) + [{"name": "ray-logs", "mountPath": "/tmp/ray"}]
            out.append((f"{obj['kind']}/{cname} head/autoscaler", head, sidecar))
    return out


def restricted_violations(pod: dict, c: dict) -> list[str]:
    """What the Kubernetes Pod Security Standard `restricted` (v1.32) forbids in ``c`` of ``pod``."""
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    bad = []
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        bad.append("host namespaces")
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']} of type {kinds}")
    if csc.get("privileged"):
        bad.append("privileged")
    if any(p.get("hostPort") for p in c.get("ports", [])):
        bad.append("hostPort")
    if csc.get("allowPrivilegeEscalation") is not False:
        bad.append("allowPrivilegeEscalation is not false")
    caps = csc.get("capabilities", {})
    if "ALL" not in caps.get("drop", []):
        bad.append("capabilities do not drop ALL")
    if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
        bad.append(f"capabilities add {caps['add']}")
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
        bad.append("runAsNonRoot is not true")
    if csc.get("runAsUser", psc.get("runAsUser")) == 0:
        bad.append("runAsUser 0")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        bad.append(f"seccompProfile {seccomp}")
    return bad


def test_namespace_enforces_restricted_pod_security(rendered):
    name, objs = rendered
    (ns,) = [o for o in objs if o["kind"] == "Namespace"]
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", f"{name}: {mode}"


def test_every_container_meets_the_restricted_standard(rendered):
    name, objs = rendered
    checked = 0
    for obj in objs:
        for where, pod, c in _containers(obj):
            assert not restricted_violations(pod, c), f"{name}: {where}: {restricted_violations(pod, c)}"
            checked += 1
    assert checked == 10  # 8 pod templates + 2 autoscaler sidecars


def test_restricted_check_rejects_what_baseline_allows():
    obj = next(o for o in render(K8S / "base") if o["kind"] == "RayCluster")
    _, pod, c = _containers(obj)[0]
    for mutate in (
        lambda p, c: p["securityContext"].pop("seccompProfile"),
        lambda p, c: c["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p, c: c["securityContext"]["capabilities"].update(add=["SYS_PTRACE"]),
        lambda p, c: p["securityContext"].pop("runAsNonRoot"),
        lambda p, c: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    ):
        p2, c2 = copy.deepcopy(pod), copy.deepcopy(c)
        mutate(p2, c2)
        assert restricted_violations(p2, c2)


def _writable_dirs(pod: dict, c: dict) -> list[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = []
    for m in c.get("volumeMounts", []):
        v = volumes.get(m["name"], {"emptyDir": {}} if m["name"] == "ray-logs" else {})
        pvc_ro = v.get("persistentVolumeClaim", {}).get("readOnly", False)
        if ("emptyDir" in v or "persistentVolumeClaim" in v) and not m.get("readOnly") and not pvc_ro:
            out.append(m["mountPath"].rstrip("/"))
    return out


def _under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in dirs)


WRITE_ENV = (
    "HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH",
)


def test_root_filesystems_are_read_only_with_writable_scratch(rendered):
    """Each process can write where it must: /tmp for everyone, Ray's session dir /tmp/ray and
    ~/.cache (pip, torch, Triton) for Ray processes, the dirs its environment names."""
    name, objs = rendered
    for obj in objs:
        for where, pod, c in _containers(obj):
            label = f"{name}: {where}"
            assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, label
            dirs = _writable_dirs(pod, c)
            needs = ["/tmp"]
            if obj["kind"] in RAY_KINDS and not where.endswith("ray-job-submitter"):
                needs += ["/tmp/ray"] + ([] if where.endswith("autoscaler") else ["/home/ray/.cache"])
            if where.endswith("ray-job-submitter"):
                needs += ["/home/ray/.cache"]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            needs += [env[k] for k in WRITE_ENV if env.get(k)]
            for path in needs:
                assert _under(path, dirs), f"{label}: {path} is not on a writable volume ({dirs})"


def test_ray_session_dir_is_the_volume_kuberay_shares_with_the_autoscaler(rendered):
    """KubeRay mounts the volume named `ray-logs` into the autoscaler; the head must define it."""
    name, objs = rendered
    for cname, cluster in _clusters(objs):
        head = cluster["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        assert mounts.get("/tmp/ray") == "ray-logs", f"{name}: {cname}"
        assert any(v["name"] == "ray-logs" and "emptyDir" in v for v in head["volumes"]), f"{name}: {cname}"


def test_serve_pods_mount_the_shared_volume_read_only(rendered):
    name, objs = rendered
    for obj in objs:
        if obj["kind"] not in ("RayService", "RayCluster"):
            continue
        for where, pod in _pod_specs(obj):
            claims = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_CLAIM}
            assert claims, f"{name}: {where} does not mount {SHARED_CLAIM}"
            vols = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                for m in c["volumeMounts"]:
                    if m["name"] in claims:
                        ro = m.get("readOnly", False) and vols[m["name"]]["persistentVolumeClaim"].get("readOnly", False)
                        # Serve only reads; extraction and training write features and checkpoints.
                        assert ro == (obj["kind"] == "RayService"), f"{name}: {obj['kind']} {where}/{c['name']}"


# Egress evaluation: NetworkPolicy semantics for matchLabels selectors, pod and ipBlock peers.


def _selects(selector: dict, labels: dict) -> bool:
    assert "matchExpressions" not in selector, "matchExpressions are not evaluated by this test"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, dest: dict, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        if "ip" not in dest:
            return False
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(dest["ip"])
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if "ip" in dest:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], dest["ns_labels"]):
            return False
    elif dest["ns_labels"].get("kubernetes.io/metadata.name") != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), dest["labels"])


def egress_allowed(objs: list[dict], src: dict, dest: dict, port: int, protocol: str = "TCP") -> bool:
    policies = [
        o for o in objs
        if o["kind"] == "NetworkPolicy" and "Egress" in o["spec"].get("policyTypes", [])
        and _selects(o["spec"]["podSelector"], src)
    ]
    if not policies:
        return True
    for p in policies:
        for rule in p["spec"].get("egress", []):
            ports = rule.get("ports")
            if ports and not any(q.get("protocol", "TCP") == protocol and q.get("port") == port for q in ports):
                continue
            peers = rule.get("to")
            if not peers or any(_peer_matches(peer, dest, p["metadata"]["namespace"]) for peer in peers):
                return True
    return False


def _pod_labels(objs: list[dict]) -> dict[str, dict]:
    """The labels of each pod the objects create (KubeRay adds its own to Ray pods)."""
    out = {}
    for obj in objs:
        for where, pod in _pod_specs(obj):
            if obj["kind"] == "Deployment":
                labels = dict(obj["spec"]["template"]["metadata"]["labels"])
            elif obj["kind"] == "RayJob":
                labels = dict(obj["spec"]["submitterPodTemplate"]["metadata"]["labels"])
            else:
                cluster = obj["spec"]["rayClusterConfig"] if obj["kind"] == "RayService" else obj["spec"]
                group = cluster["headGroupSpec"] if where == "head" else next(
                    g for g in cluster["workerGroupSpecs"] if g["groupName"] == where
                )
                labels = dict(group["template"]["metadata"]["labels"])
                labels.update({"ray.io/is-ray-node": "yes", "ray.io/node-type": "head" if where == "head" else "worker",
                               "ray.io/cluster": obj["metadata"]["name"]})
            out[f"{obj['kind']}/{obj['metadata']['name']}/{where}"] = labels
    return out


def _ip_rules(objs: list[dict], src: dict, port: int) -> list[str]:
    """The CIDRs an egress rule for ``src`` admits on ``port``."""
    return [
        peer["ipBlock"]["cidr"]
        for o in objs if o["kind"] == "NetworkPolicy" and _selects(o["spec"]["podSelector"], src)
        for rule in o["spec"].get("egress", []) if any(q.get("port") == port for q in rule.get("ports", []))
        for peer in rule.get("to", []) if "ipBlock" in peer
    ]


def test_egress_is_denied_by_default_and_allowed_by_list(rendered):
    name, objs = rendered
    ns = next(o for o in objs if o["kind"] == "Namespace")["metadata"]["name"]
    pols = [o["spec"] for o in objs if o["kind"] == "NetworkPolicy"]
    assert any(p["podSelector"] == {} and p["policyTypes"] == ["Egress"] and not p.get("egress") for p in pols), name
    for p in pols:
        for rule in p.get("egress", []):
            assert rule.get("to"), f"{name}: an egress rule without `to` admits every destination"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert rule.get("ports"), f"{name}: {peer} admitted on every port"
                    assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen >= 16, f"{name}: {peer} too wide"
    pods = _pod_labels(objs)
    assert len(pods) == 8
    here = {"kubernetes.io/metadata.name": ns}
    dns = {"ns_labels": {"kubernetes.io/metadata.name": "kube-system"}, "labels": {"k8s-app": "kube-dns"}}
    head = {"ns_labels": here, "labels": pods["RayCluster/mirage/head"]}
    worker = {"ns_labels": here, "labels": pods["RayCluster/mirage/train"]}
    mlflow = {"ns_labels": here, "labels": pods["Deployment/mlflow/template"]}
    internet = {"ip": "1.1.1.1"}
    for pod, labels in pods.items():
        for proto in ("UDP", "TCP"):
            assert egress_allowed(objs, labels, dns, 53, proto), f"{name}: {pod} cannot resolve names ({proto})"
        assert not egress_allowed(objs, labels, internet, 443), f"{name}: {pod} reaches the internet"
        assert not egress_allowed(objs, labels, {"ip": "8.8.8.8"}, 53, "UDP"), f"{name}: {pod} reaches outside DNS"
        if labels.get("ray.io/is-ray-node") == "yes":
            same = {"ns_labels": here, "labels": {**labels, "ray.io/node-type": "head"}}
            assert egress_allowed(objs, labels, same, 6379), f"{name}: {pod} cannot reach its GCS"
            assert egress_allowed(objs, labels, worker, 45123), f"{name}: {pod} cannot reach Ray workers"
            assert egress_allowed(objs, labels, mlflow, 5000), f"{name}: {pod} cannot log to MLflow"
            assert not egress_allowed(objs, labels, {"ns_labels": {"kubernetes.io/metadata.name": "other"},
                                                     "labels": labels}, 6379), f"{name}: {pod} leaves the namespace"
    submitter = pods["RayJob/mirage-paper-sweep/submitter"]
    assert egress_allowed(objs, submitter, head, 8265) and not egress_allowed(objs, submitter, worker, 6379)
    mlflow_labels = mlflow["labels"]
    for port, what in ((5432, "PostgreSQL"), (443, "S3")):
        cidrs = _ip_rules(objs, mlflow_labels, port)
        assert cidrs, f"{name}: MLflow has no egress to {what} on {port}"
        ip = str(ipaddress.ip_network(cidrs[0])[0])
        assert egress_allowed(objs, mlflow_labels, {"ip": ip}, port), what
        assert not egress_allowed(objs, mlflow_labels, {"ip": ip}, 22), f"{name}: {what} reachable on port 22"
        assert not egress_allowed(objs, worker["labels"], {"ip": ip}, port), f"{name}: workers reach {what}"
    assert _ip_rules(objs, head["labels"], 443) or _ip_rules(objs, head["labels"], 6443), (
        f"{name}: the autoscaler cannot reach the Kubernetes API"
    )


def test_extraction_loads_weights_from_the_shared_cache_offline(rendered):
    """With egress closed the Hub is unreachable: extraction reads the cache on the shared volume
    and fails at once when weights are missing instead of retrying connections."""
    name, objs = rendered
    cluster = next(o for o in objs if o["kind"] == "RayCluster")["spec"]
    pod = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "extract")["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env.get("HF_HUB_OFFLINE") == "1", name
    assert _under(env["HF_HOME"], _writable_dirs(pod, pod["containers"][0])) and env["HF_HOME"].startswith("/mnt/mirage/")
    assert load_config("paper").features.local_files_only is True


def test_images_are_pinned_to_a_commit_or_digest(rendered):
    name, objs = rendered
    images = set()
    for obj in objs:
        for where, _, c in _containers(obj):
            if "image" not in c:  # the autoscaler runs the head's image
                continue
            assert PINNED_IMAGE.fullmatch(c["image"]), f"{name}: {where} runs {c['image']}, a tag that can move"
            assert c.get("imagePullPolicy") in ("IfNotPresent", "Always"), where
            images.add(c["image"])
    assert len(images) == 1, f"{name}: every component should run the same build, got {images}"


def test_readme_rebuilds_under_a_new_tag():
    sec = _readme_section("Run on Kubernetes")
    assert "git rev-parse" in sec and "kustomize edit set image mirage-platform=" in sec
    assert not re.search(r"mirage-platform:\d+\.\d+\.\d+", sec), "a version tag is reused across rebuilds"


def _mlflow_container(objs: list[dict]) -> tuple[dict, dict]:
    deploy = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    pod = deploy["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_mlflow_requires_authentication(rendered):
    from importlib.metadata import entry_points

    name, objs = rendered
    pod, c = _mlflow_container(objs)
    assert "--app-name=basic-auth" in c["args"], f"{name}: MLflow serves without authentication"
    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}
    env = {e["name"]: e for e in c["env"]}
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth", var
    config = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mount = next(m for m in c["volumeMounts"] if config.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "mlflow-auth" and mount.get("readOnly") is True
    clients = 0
    for obj in objs:
        for where, _, cont in _containers(obj):
            cenv = {e["name"]: e for e in cont.get("env", [])}
            if "MLFLOW_TRACKING_URI" in cenv:
                clients += 1
                for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                    assert cenv[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-client", f"{name}: {where} {var}"
    assert clients == 6  # every Ray node: RayCluster head + 3 groups, RayService head + 1 group


def test_mlflow_probes_pass_without_credentials():
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF), installed in the image")
    from mlflow.server.auth import is_unprotected_route

    _, c = _mlflow_container(render(K8S / "base"))
    for probe in ("readinessProbe", "livenessProbe"):
        assert is_unprotected_route(c[probe]["httpGet"]["path"]), f"{probe} would get 401"
    assert not is_unprotected_route("/api/2.0/mlflow/experiments/search")


def test_image_has_the_mlflow_auth_extra():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install .*mlflow\[auth\]", text, re.M), "the basic-auth app needs mlflow[auth]"
