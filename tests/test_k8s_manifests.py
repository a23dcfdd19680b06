"""Offline validation of k8s/: render every overlay (kustomize semantics in Python) and check each
object against its schema (KubeRay v1.7.0 CRDs for ray.io, Kubernetes OpenAPI for built-in kinds),
then the promises the manifests make: non-root, no secret values, a head that runs no work,
bounded autoscaling, MLflow Host checking, nothing exposed outside the cluster."""

from __future__ import annotations

import copy
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
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches"}


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


def render(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k directory` creates (resources, namespace, JSON 6902 patches)."""
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
    assert {"mlflow-backend", "mlflow-s3", "mirage"} <= secret_refs


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
    assert argv[:4] == ["python", "jobs/sweep.py", "--config", "configs/paper.yaml"]
    assert (ROOT / "configs/paper.yaml").is_file()
    cfg = load_config(str(ROOT / argv[3]), _set_overrides(argv))
    assert cfg.tracking.uri.startswith("http://mlflow.") and cfg.data.root.startswith("/mnt/mirage")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert {".git", "outputs", ".venv"} <= set(env["excludes"])
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "mirage"}


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
    assert "-- python jobs/sweep.py --config configs/paper.yaml" in sec
    for secret in ("mlflow-backend", "mlflow-s3"):
        assert f"create secret generic {secret}" in sec
