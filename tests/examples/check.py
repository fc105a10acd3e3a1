"""Checks the deployment examples against each other and against idsync: what a reader copies must
fit together (the names a manifest refers to exist, the config is mounted where IDSYNC_CONFIG
says, the identity annotated is the one the configuration signs in as) and keep the properties the
README promises (one run at a time, no retry that races the next run, non-root, read-only root
filesystem, the probes on the listener's port). Each idsync.toml is validated by the binary in
crates/cli/tests/examples.rs.

Usage: python check.py REPO_ROOT   (run by scripts/examples.sh)
"""

import json
import pathlib
import re
import sys
import tomllib

import yaml

problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


def kubernetes(root):
    d = root / "examples/kubernetes"
    kust = yaml.safe_load((d / "kustomization.yaml").read_text())
    docs = {}
    listed = list(kust["resources"]) + ["deployment.yaml"]
    for name in listed:
        path = d / name
        check(path.is_file(), f"kubernetes: {name} is listed but missing")
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    gen = kust["configMapGenerator"][0]
    for f in gen["files"]:
        check((d / f).is_file(), f"kubernetes: the ConfigMap's {f} is missing")
    cfg = tomllib.loads((d / "idsync.toml").read_text())
    sa = docs["ServiceAccount"]
    check(
        sa["metadata"]["annotations"]["azure.workload.identity/client-id"] == cfg["source"]["client_id"],
        "kubernetes: the ServiceAccount's client id is not the one idsync.toml signs in as",
    )
    check(cfg["source"].get("auth") == "workload_identity", "kubernetes: idsync.toml does not use workload identity")

    def pod_checks(kind, pod, want_args):
        spec = pod["spec"]
        check(spec["serviceAccountName"] == sa["metadata"]["name"], f"{kind}: another service account")
        check(pod["metadata"]["labels"].get("azure.workload.identity/use") == "true", f"{kind}: no workload identity label")
        check(spec["securityContext"]["runAsNonRoot"] is True, f"{kind}: may run as root")
        check(spec["terminationGracePeriodSeconds"] >= 60, f"{kind}: too short a grace period to finish the writes in flight")
        (c,) = spec["containers"]
        check(c["args"][: len(want_args)] == want_args, f"{kind}: args {c['args']}")
        sc = c["securityContext"]
        check(sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, f"{kind}: container security context")
        check(sc["capabilities"]["drop"] == ["ALL"], f"{kind}: capabilities kept")
        env = {e["name"]: e.get("value") for e in c["env"]}
        (mount,) = c["volumeMounts"]
        check(env["IDSYNC_CONFIG"] == mount["mountPath"] + "/idsync.toml", f"{kind}: IDSYNC_CONFIG is not where the config is mounted")
        vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        check(vol["configMap"]["name"] == gen["name"], f"{kind}: mounts another ConfigMap")
        check(c["envFrom"][0]["secretRef"]["name"] == "idsync-secrets", f"{kind}: another secret")
        check("memory" in c["resources"]["limits"], f"{kind}: no memory limit")
        return c

    cj = docs["CronJob"]
    check(cj["spec"]["concurrencyPolicy"] == "Forbid", "CronJob: runs may overlap")
    job = cj["spec"]["jobTemplate"]["spec"]
    check(job["backoffLimit"] == 0, "CronJob: Kubernetes retries a failed run (the next run resumes it)")
    pod = job["template"]
    check(pod["spec"]["restartPolicy"] == "Never", "CronJob: restartPolicy")
    pod_checks("CronJob", pod, ["run", "--once"])

    dep = docs["Deployment"]
    check(dep["spec"]["replicas"] == 1, "Deployment: more than one replica")
    c = pod_checks("Deployment", dep["spec"]["template"], ["run", "--listen"])
    port = int(c["args"][c["args"].index("--listen") + 1].rsplit(":", 1)[1])
    check(c["ports"][0]["containerPort"] == port, "Deployment: the port is not the listener's")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "Deployment: liveness probe")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "Deployment: readiness probe")
    check(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port), "Deployment: scrape port")
    check("every" in cfg.get("run", {}), "kubernetes: the Deployment needs [run] every")


def databricks(root):
    d = root / "examples/databricks"
    bundle = yaml.safe_load((d / "databricks.yml").read_text())
    job = bundle["resources"]["jobs"]["idsync"]
    check(job["max_concurrent_runs"] == 1, "databricks: runs may overlap")
    check(re.fullmatch(r"\S+ \S+ \S+ \S+ \S+ \S+", job["schedule"]["quartz_cron_expression"]) is not None, "databricks: not a Quartz expression")
    (task,) = job["tasks"]
    check(task["max_retries"] == 0, "databricks: retries race the next run")
    script = d / task["spark_python_task"]["python_file"]
    check(script.is_file(), "databricks: the task's script is missing")
    compile(script.read_text(), str(script), "exec")  # a syntax check that writes no .pyc
    check(task["spark_python_task"]["parameters"] == ["run", "--once"], "databricks: parameters")
    env = task["new_cluster"]["spark_env_vars"]
    check(env["IDSYNC_CONFIG"].endswith("/idsync.toml"), "databricks: IDSYNC_CONFIG")
    for name, value in env.items():
        if "SECRET" in name or "WEBHOOK" in name:
            check(re.fullmatch(r"\{\{secrets/[\w-]+/[\w-]+\}\}", value) is not None, f"databricks: {name} is not a secret reference")
    cfg = tomllib.loads((d / "idsync.toml").read_text())
    check(cfg["state"]["url"].startswith("abfss://"), "databricks: state not in ADLS")


def ci(root):
    d = root / "examples/ci"
    wf = yaml.safe_load((d / "github-actions.yml").read_text())
    on = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads the key `on` as true
    check(len(on["schedule"][0]["cron"].split()) == 5, "ci: the schedule is not a cron line")
    check(wf["concurrency"]["cancel-in-progress"] is False, "ci: a run may be cancelled mid-apply")
    check(wf["permissions"]["id-token"] == "write", "ci: no OIDC token")
    steps = wf["jobs"]["idsync"]["steps"]
    run = next(s for s in steps if s.get("name") == "idsync")
    check("$IDSYNC_IMAGE" in run["run"] and "AZURE_FEDERATED_TOKEN_FILE" in run["run"], "ci: the idsync step")
    for name in run["env"]:
        if name != "COMMAND":
            check(f"-e {name}" in run["run"], f"ci: {name} is not passed into the container")


def dockerfile(root):
    text = (root / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    check(len(stages) == 2 and stages[-1].endswith(":nonroot"), "Dockerfile: the image is not a non-root distroless one")
    check(re.search(r"^USER nonroot", text, re.M) is not None, "Dockerfile: no USER")
    check("--locked" in text and "--no-default-features" in text, "Dockerfile: the build is not the production one")
    dest = re.search(r"^COPY --from=build \S+ (\S+)", text, re.M).group(1)
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    check(entry[0] == dest, "Dockerfile: the entrypoint is not the copied binary")
    ignore = (root / ".dockerignore").read_text().split()
    check("*" in ignore and "!crates/" in ignore, ".dockerignore: the context is not limited to the sources")


def main():
    root = pathlib.Path(sys.argv[1]).resolve()
    for f in (kubernetes, databricks, ci, dockerfile):
        f(root)
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print("the deployment examples fit together")


main()
