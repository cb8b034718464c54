"""`irsa-cache inject`: the webhook's cases through YAML files, every workload kind, a
multi-document stream, comments and unknown fields kept, bad input refused.

Most tests run the command in-process (`daemon.__main__.main`) on files; those about
exit status, stdin and the absence of tracebacks run the real `irsa-cache` in a
subprocess. Outputs are read back with PyYAML (another parser than the one that wrote
them) and validated against the Kubernetes schemas."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from daemon.__main__ import main
from daemon.webhook import mutation
from daemon.webhook.mutation import Outcome
from tests.webhook_cases import (
    CASE_IDS,
    CASES,
    ROLE,
    Case,
    account,
    assert_points_at_cache,
    container,
    template,
)

KUBERNETES = kubernetes_validate.latest_version()
IRSA_CACHE = [sys.executable, "-m", "daemon"]


def deployment(pod_template: dict[str, Any], namespace: str = "shop", name: str = "checkout") -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "checkout"}}, "template": pod_template}}


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, *args: str) -> tuple[int, str, str]:
    source = tmp_path / "app.yaml"
    source.write_text(text)
    status = main(["inject", "-f", str(source), *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def validate(text: str) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    return docs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_case_through_a_yaml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case) -> None:
    objects = ([case.account] if case.account else []) + [deployment(case.template, case.namespace)]
    text = yaml.safe_dump_all(objects, sort_keys=False)

    status, out, err = run(tmp_path, capsys, text)

    assert status == 0, err
    (*_, result) = validate(out)
    assert_points_at_cache(result["spec"]["template"], case, case.template)
    assert f"deployment/checkout in {case.namespace}: {case.outcome.value}" in err
    if case.outcome is not Outcome.MUTATED:
        assert out == text, "an unchanged document is written back byte for byte"


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome is Outcome.MUTATED], ids=lambda c: c.id)
def test_inject_makes_the_webhooks_change(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case) -> None:
    """One code path: the template comes out exactly as the mutation function makes it."""
    text = yaml.safe_dump_all([case.account, deployment(case.template)], sort_keys=False)
    _, out, _ = run(tmp_path, capsys, text)
    expected = mutation.mutate(copy.deepcopy(case.template), namespace="shop", role_arn=ROLE,
                               settings=mutation.InjectionSettings()).pod
    assert list(yaml.safe_load_all(out))[1]["spec"]["template"] == expected


MANIFEST = textwrap.dedent("""\
    # Shop: checkout, everything it runs. Applied by Argo CD.
    ---
    apiVersion: v1
    kind: ServiceAccount
    metadata:
      name: checkout
      namespace: shop
      annotations:
        eks.amazonaws.com/role-arn: arn:aws:iam::111122223333:role/checkout
    ---
    # The web tier.
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: checkout
      namespace: shop
      x-internal-owner: payments   # a field Kubernetes does not know
    spec:
      replicas: 3
      selector:
        matchLabels: {app: checkout}
      template:
        metadata:
          labels:
            app: checkout  # the selector's label
        spec:
          serviceAccountName: checkout
          containers:
            - name: app
              image: "shop/checkout:1.2"   # pinned by Renovate
              args: ['--port', "8080"]
              env:
                - name: LOG_LEVEL
                  value: info  # noisy otherwise
              # The port the Service targets.
              ports:
                - containerPort: 8080
          # Scratch space.
          volumes:
            - name: scratch
              emptyDir: {}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: checkout, namespace: shop}
    spec:
      selector: {app: checkout}
      ports: [{port: 80, targetPort: 8080}]   # flow style stays
    ---
    apiVersion: v1
    kind: Pod
    metadata:
      name: debug
      namespace: shop
    spec:
      serviceAccountName: checkout
      containers:
      - name: shell
        image: busybox
        command: ["sleep", "3600"]
    ---
    apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: ledger, namespace: shop}
    spec:
      serviceName: ledger
      selector: {matchLabels: {app: ledger}}
      template:
        metadata: {labels: {app: ledger}}
        spec:
          serviceAccountName: checkout
          containers: [{name: ledger, image: ledger:3}]
    ---
    apiVersion: apps/v1
    kind: DaemonSet
    metadata: {name: shipper, namespace: shop}
    spec:
      selector: {matchLabels: {app: shipper}}
      template:
        metadata: {labels: {app: shipper}}
        spec:
          serviceAccountName: checkout
          containers: [{name: shipper, image: shipper:1}]
    ---
    apiVersion: apps/v1
    kind: ReplicaSet
    metadata: {name: legacy, namespace: shop}
    spec:
      selector: {matchLabels: {app: legacy}}
      template:
        metadata: {labels: {app: legacy}}
        spec:
          serviceAccountName: checkout
          containers: [{name: legacy, image: legacy:1}]
    ---
    apiVersion: batch/v1
    kind: Job
    metadata: {name: migrate, namespace: shop}
    spec:
      template:
        spec:
          serviceAccountName: checkout
          restartPolicy: Never
          containers: [{name: migrate, image: migrate:1}]
    ---
    apiVersion: batch/v1
    kind: CronJob
    metadata: {name: report, namespace: shop}
    spec:
      schedule: "0 3 * * *"
      jobTemplate:
        spec:
          template:
            spec:
              serviceAccountName: checkout
              restartPolicy: OnFailure
              containers: [{name: report, image: report:1}]
    # end of the stream
    """)

WORKLOADS = {("Deployment", "checkout"), ("Pod", "debug"), ("StatefulSet", "ledger"), ("DaemonSet", "shipper"),
             ("ReplicaSet", "legacy"), ("Job", "migrate"), ("CronJob", "report")}


def pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def test_every_workload_kind_in_one_multi_document_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(tmp_path, capsys, MANIFEST)

    assert status == 0, err
    unknown = "  x-internal-owner: payments   # a field Kubernetes does not know\n"
    assert unknown in out
    docs = validate(out.replace(unknown, ""))  # strict: the one unknown field is there on purpose
    assert [d["kind"] for d in docs] == [d["kind"] for d in yaml.safe_load_all(MANIFEST) if d]
    seen = set()
    for doc in docs:
        if (doc["kind"], doc["metadata"]["name"]) in WORKLOADS:
            seen.add((doc["kind"], doc["metadata"]["name"]))
            pod = pod_of(doc)
            for item in pod["spec"]["containers"]:
                env = {v["name"]: v["value"] for v in item["env"]}
                assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] == mutation.CREDENTIALS_URI
            assert pod["metadata"]["labels"][mutation.SKIP_POD_IDENTITY_LABEL] == "true"
    assert seen == WORKLOADS
    assert len(err.splitlines()) == len(WORKLOADS) and err.count(": mutated: ") == len(WORKLOADS)


def test_comments_quoting_and_unknown_fields_are_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(tmp_path, capsys, MANIFEST)

    comments = [line.strip() for line in MANIFEST.splitlines() if "#" in line]
    kept = [line.strip() for line in out.splitlines() if "#" in line]
    assert kept == comments, "every comment line, in its order"
    for line in ("x-internal-owner: payments   # a field Kubernetes does not know",
                 'image: "shop/checkout:1.2"   # pinned by Renovate',
                 "args: ['--port', \"8080\"]",
                 "ports: [{port: 80, targetPort: 8080}]   # flow style stays"):
        assert line in out
    lines = out.splitlines()
    # A comment that introduces a key stays right above that key, even though the list
    # before it (env, then volumes) grew.
    assert lines[lines.index("          # The port the Service targets.") + 1] == "          ports:"
    assert lines[lines.index("      # Scratch space.") + 1] == "      volumes:"
    assert out.endswith("# end of the stream\n")


def test_unchanged_documents_are_byte_for_byte_and_style_follows_each_document(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(tmp_path, capsys, MANIFEST)
    chunks_in, chunks_out = MANIFEST.split("\n---\n"), out.split("\n---\n")
    assert len(chunks_in) == len(chunks_out)
    assert chunks_out[0] == chunks_in[0] and chunks_out[1] == chunks_in[1], "comment block and ServiceAccount"
    assert chunks_out[3] == chunks_in[3], "the Service"
    # The Pod is written with sequences flush with their key, as it was; the Deployment indented.
    assert "\n  containers:\n  - name: shell\n" in chunks_out[4]
    assert "\n      containers:\n        - name: app\n" in chunks_out[2]


def test_inject_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, once, _ = run(tmp_path, capsys, MANIFEST)
    status, twice, err = run(tmp_path, capsys, once)
    assert status == 0 and twice == once
    assert err.count(": unchanged: already points at irsa-cache") == len(WORKLOADS)


def test_role_from_the_command_line_and_the_default_namespace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump_all([
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
         "spec": {"selector": {"matchLabels": {"app": "web"}},
                  "template": template(container("app"), service_account="web")}}], sort_keys=False)

    _, out, err = run(tmp_path, capsys, text)
    assert out == text and "no_role: ServiceAccount default/web is not in the input, and no --role names it" in err

    _, out, err = run(tmp_path, capsys, text, "--role", f"default/web={ROLE}")
    assert "deployment/web in default: mutated" in err

    _, out, err = run(tmp_path, capsys, text, "-n", "team-a", "--role", f"team-a/web={ROLE}")
    assert "deployment/web in team-a: mutated" in err


def test_service_account_in_the_input_without_a_role(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump_all([account(role=None), deployment(template(container("app")))], sort_keys=False)
    _, out, err = run(tmp_path, capsys, text)
    assert out == text
    assert "no_role: ServiceAccount shop/checkout has no eks.amazonaws.com/role-arn annotation" in err


def test_flags_shape_the_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump_all([account(), deployment(template(container("app")))], sort_keys=False)
    _, out, _ = run(tmp_path, capsys, text, "--audience", "irsa-cache", "--token-expiration", "1h")
    volumes = list(yaml.safe_load_all(out))[1]["spec"]["template"]["spec"]["volumes"]
    assert volumes[-1]["projected"]["sources"][0]["serviceAccountToken"] == {
        "audience": "irsa-cache", "expirationSeconds": 3600, "path": "token"}


def test_a_list_as_kubectl_get_writes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [
        account(), deployment(template(container("app")))]}, sort_keys=False)
    status, out, err = run(tmp_path, capsys, text)
    assert status == 0 and "deployment/checkout in shop: mutated" in err
    (listed,) = yaml.safe_load_all(out)
    assert mutation.VOLUME_NAME in {v["name"] for v in listed["items"][1]["spec"]["template"]["spec"]["volumes"]}


def test_reads_stdin_and_writes_stdout() -> None:
    text = yaml.safe_dump_all([account(), deployment(template(container("app")))], sort_keys=False)
    for args in (["inject"], ["inject", "-"], ["inject", "-f", "-"]):
        result = subprocess.run([*IRSA_CACHE, *args], input=text, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert mutation.TOKEN_FILE in result.stdout
        assert result.stderr.strip() == "irsa-cache: deployment/checkout in shop: mutated: pointed at irsa-cache: app"


@pytest.mark.parametrize(("args", "stdin", "message"), [
    pytest.param([], "apiVersion: v1\nkind: Pod\nmetadata: {name: x\n", "stdin: line 4, column 1",
                 id="unparsable YAML"),
    pytest.param([], "a: 1\n---\nb: [1, 2\n", "stdin: line 4, column 1", id="second document broken"),
    pytest.param([], "a: 1\na: 2\n", "stdin: line 2, column 1: found duplicate key", id="duplicate key"),
    pytest.param(["--role", "shop-checkout=arn:aws:iam::111122223333:role/x"], "",
                 "--role 'shop-checkout=arn:aws:iam::111122223333:role/x': expected NAMESPACE/SERVICEACCOUNT=ROLE_ARN",
                 id="role without namespace"),
    pytest.param(["--role", "shop/checkout=checkout-role"], "", "'checkout-role' is not an IAM role ARN",
                 id="role that is no ARN"),
    pytest.param(["-f", "/nonexistent/app.yaml"], "", "/nonexistent/app.yaml: cannot read: No such file",
                 id="missing file"),
    pytest.param(["--token-expiration", "60"], "", "--token-expiration: '60' must be whole seconds from 600",
                 id="token too short"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], stdin: str, message: str) -> None:
    result = subprocess.run([*IRSA_CACHE, "inject", *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == "", "nothing half-written"
    (line,) = result.stderr.splitlines()
    assert line.startswith("irsa-cache: error: ") and message in line, line


@pytest.mark.parametrize("text", [
    pytest.param("a: 1\n", id="one document"),
    pytest.param("---\na: 1\n...\n---\nb: 2\n", id="end markers"),
    pytest.param("%YAML 1.2\n---\na: 1\n---\nb: 2\n", id="a directive"),
    pytest.param("a: 0\n...\n%YAML 1.2\n---\na: 1\n", id="a directive after an end marker"),
    pytest.param("# only a comment\n", id="comments only"),
    pytest.param("--- {a: 1}\n--- [1, 2]\n", id="content on the marker line"),
    pytest.param("a: |\n  text\n  --- indented, so no marker\nb: 2\n", id="a block scalar"),
    pytest.param("# head\n---\n# about a\na: 1\n\n\n# tail\n", id="comments around"),
])
def test_streams_without_workloads_come_out_as_they_went_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    status, out, err = run(tmp_path, capsys, text)
    assert (status, out, err) == (0, text, "")


def test_a_document_with_markers_and_a_directive_keeps_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pod = yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"},
                          "spec": {"serviceAccountName": "checkout", "containers": [{"name": "c", "image": "x"}]}})
    text = f"%YAML 1.2\n---\n{pod}...\n"
    status, out, _ = run(tmp_path, capsys, text, "--role", f"shop/checkout={ROLE}")
    assert status == 0
    assert out.startswith("%YAML 1.2\n---\n") and out.endswith("...\n")
    assert mutation.TOKEN_FILE in out
