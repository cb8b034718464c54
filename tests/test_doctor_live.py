"""`irsa-cache doctor --live` against real parts: the Kubernetes API double (with
TokenRequest) through the real kubernetes-asyncio client, moto as IAM through
aiobotocore, and STS through the STS double, which forwards to moto or answers STS's
real errors (moto's STS accepts any token, so every STS verdict but success is the
double's, in STS's own words).

Each scenario of the catalogue whose inputs can exist in a cluster and in IAM is loaded
into them and checked again live; then the map from each STS error to its link, and
the live reads that fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web

from daemon.doctor import cli
from daemon.embedded import Issuer, MotoSts
from tests.doctor_scenario import Scenario, assert_expected, scenarios
from tests.k8s_double import K8sApiDouble
from tests.sts_double import StsDouble, sts_error

LIVE = [s for s in scenarios() if "skip" not in (s.spec.get("live") or {})]
GOOD = next(s for s in scenarios() if s.name == "good")


def test_most_of_the_catalogue_runs_live() -> None:
    assert len(LIVE) >= 20


@pytest.fixture(scope="module")
def cluster_key() -> Issuer:
    return Issuer()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_sts: MotoSts, sts: StsDouble) -> dict[str, str]:
    """The operator's AWS environment: test credentials, IAM at moto, STS at the double."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_IAM": moto_sts.url, "AWS_ENDPOINT_URL_STS": sts.url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _clean(iam: Any) -> None:
    for provider in iam.list_open_id_connect_providers()["OpenIDConnectProviderList"]:
        iam.delete_open_id_connect_provider(OpenIDConnectProviderArn=provider["Arn"])
    for role in iam.list_roles()["Roles"]:
        if role["Path"] == "/doctor-test/" or role["RoleName"].startswith("team-a-"):
            iam.delete_role(RoleName=role["RoleName"])


@pytest.fixture(scope="module")
def iam_client(moto_sts: MotoSts) -> Any:
    return boto3.client("iam", region_name="us-east-1", endpoint_url=moto_sts.url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def iam(iam_client: Any) -> Iterator[Any]:
    """moto's IAM, emptied of doctor's roles and of every OIDC provider before and after."""
    _clean(iam_client)
    yield iam_client
    _clean(iam_client)


@pytest.fixture
async def cluster_for() -> AsyncIterator[Any]:
    doubles: list[K8sApiDouble] = []

    async def start(issuer: str, key: Issuer) -> K8sApiDouble:
        double = await K8sApiDouble(issuer=issuer, jwks=key.jwks(), minter=key).start()
        doubles.append(double)
        return double

    yield start
    for double in doubles:
        await double.stop()


def role_of(scenario: Scenario) -> str | None:
    annotated = ((scenario.yaml("service-account.yaml") or {}).get("metadata") or {}).get("annotations") or {}
    return scenario.arg("--role-arn") or annotated.get("eks.amazonaws.com/role-arn")


def load_iam(scenario: Scenario, iam: Any) -> None:
    role = role_of(scenario)
    trust = scenario.json("trust-policy.json")
    if role and trust is not None:
        iam.create_role(RoleName=role.rpartition("/")[2], AssumeRolePolicyDocument=json.dumps(trust))
    for provider in scenario.json("oidc-providers.json") or []:
        created = iam.create_open_id_connect_provider(
            Url=f"https://{provider['Url']}", ClientIDList=provider["ClientIDList"], ThumbprintList=["a" * 40])
        assert created["OpenIDConnectProviderArn"] == provider["Arn"]


def load_cluster(scenario: Scenario, double: K8sApiDouble) -> None:
    for name in ("service-account.yaml", "pod.yaml"):
        if (obj := scenario.yaml(name)) is not None:
            double.create(obj)


def live_argv(scenario: Scenario, kubeconfig: Path) -> list[str]:
    argv = ["--live", "--kubeconfig", str(kubeconfig), "--json"]
    pod, account = scenario.yaml("pod.yaml"), scenario.yaml("service-account.yaml")
    if pod is not None:
        argv += ["--pod-name", f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"]
    elif account is not None:
        argv += ["--service-account-name", f"{account['metadata']['namespace']}/{account['metadata']['name']}"]
    for flag in ("--role-arn", "--audience"):
        if (value := scenario.arg(flag)) is not None:
            argv += [flag, value]
    return argv


async def run_live(argv: list[str]) -> tuple[int, dict[str, Any]]:
    status, out, error = await cli.run(cli.parser().parse_args(argv), environ=dict(os.environ))
    assert error == "", error
    return status, json.loads(out)


async def prepare(scenario: Scenario, *, iam: Any, cluster_for: Any, key: Issuer, tmp_path: Path) -> list[str]:
    load_iam(scenario, iam)
    double = await cluster_for(scenario.issuer, key)
    load_cluster(scenario, double)
    return live_argv(scenario, double.write_kubeconfig(tmp_path / "kubeconfig"))


def by_id(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["id"]: check for check in report["checks"]}


@pytest.mark.parametrize("scenario", LIVE, ids=[s.name for s in LIVE])
async def test_scenario_live(scenario: Scenario, aws_env: dict[str, str], iam: Any, cluster_for: Any,
                             cluster_key: Issuer, sts: StsDouble, tmp_path: Path) -> None:
    sts_error = (scenario.spec.get("live") or {}).get("sts_error")
    if sts_error:
        sts.fail_with(sts_error["code"], sts_error["message"], status=sts_error["status"])
    argv = await prepare(scenario, iam=iam, cluster_for=cluster_for, key=cluster_key, tmp_path=tmp_path)
    status, report = await run_live(argv)

    expected = scenario.expected
    fails = dict(expected["fails"])
    expect_sts = (expected.get("live") or {}).get("sts", "pass")
    if sts_error:
        fails["sts.assume-role"] = [sts_error["code"], "the broken link is"]
    assert_expected(report["checks"], fails=fails, warns=expected.get("warns") or {},
                    broken_link=expected.get("broken_link"), where=f"{scenario.name} (live)")
    assert status == (1 if fails else 0)
    checks = by_id(report)
    sts_check = checks["sts.assume-role"]
    if expect_sts == "pass":
        assert sts_check["status"] == "pass", sts_check
        assert "assumed-role/team-a-app/team-a.app" in sts_check["message"]
    else:
        assert sts_check["link"] == expect_sts, sts_check
    # Everything was fetched live, and every fetch succeeded.
    for fetched in ("pod.read", "service-account.read", "token.discovery", "token.request", "trust-policy.read",
                    "provider.read"):
        if fetched in checks and not (fetched == "pod.read" and scenario.file("pod.yaml") is None):
            assert checks[fetched]["status"] == "pass", checks[fetched]
    assert [call.role_arn for call in sts.assume_calls] == [role_of(scenario)]


# STS's errors, in its own words, and the link each points at (with the good configuration
# loaded, so no other check fails and the mapping alone decides).
STS_ERRORS = [
    pytest.param("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", 403, "trust-policy",
                 "trust policy", id="access-denied"),
    pytest.param("AccessDenied", "User: arn:aws:sts::123456789012:assumed-role/x is not authorized to perform: "
                 "sts:AssumeRoleWithWebIdentity on resource: arn:aws:iam::123456789012:role/team-a-app with an "
                 "explicit deny in a service control policy", 403, "trust-policy", "SCP", id="access-denied-scp"),
    pytest.param("InvalidIdentityToken", "No OpenIDConnect provider found in your account for "
                 "https://oidc.eks.us-west-2.amazonaws.com/id/5E1B2C3D4F5A6B7C8D9E0F1A2B3C4D5E", 400, "provider",
                 "register", id="no-provider"),
    pytest.param("InvalidIdentityToken", "Incorrect token audience", 400, "provider", "client IDs",
                 id="incorrect-audience"),
    pytest.param("InvalidIdentityToken", "Missing a required claim: aud", 400, "token", "aud", id="missing-aud"),
    pytest.param("InvalidIdentityToken", "Couldn't retrieve verification key from your identity provider,  please "
                 "reference AssumeRoleWithWebIdentity documentation for requirements", 400, "provider",
                 "jwks_uri", id="verification-key"),
    pytest.param("InvalidIdentityToken", "OpenIDConnect provider's HTTPS certificate doesn't match configured "
                 "thumbprint", 400, "provider", "update-open-id-connect-provider-thumbprint", id="thumbprint"),
    pytest.param("IDPCommunicationError", "The identity provider could not be reached. Try again later.", 400,
                 "provider", "jwks_uri", id="idp-communication"),
    pytest.param("ExpiredTokenException", "Token expired: current date/time 1700000600 must be before the "
                 "expiration date/time1700000000", 400, "token", "fresh token", id="expired"),
    pytest.param("IDPRejectedClaim", "Token was rejected by the identity provider", 403, "token", "claims",
                 id="rejected-claim"),
    pytest.param("ValidationError", "The requested DurationSeconds exceeds the MaxSessionDuration set for this role.",
                 400, "trust-policy", "MaxSessionDuration", id="duration"),
    pytest.param("RegionDisabledException", "STS is not activated in this region for account:123456789012. Your "
                 "account administrator can activate STS in this region using the IAM Console.", 403, "sts",
                 "activate", id="region-disabled"),
]


@pytest.mark.parametrize(("code", "message", "http_status", "link", "word"), STS_ERRORS)
async def test_each_sts_error_points_at_its_link(code: str, message: str, http_status: int, link: str, word: str,
                                                 aws_env: dict[str, str], iam: Any, cluster_for: Any,
                                                 cluster_key: Issuer, sts: StsDouble, tmp_path: Path) -> None:
    sts.fail_with(code, message, status=http_status)
    status, report = await run_live(await prepare(GOOD, iam=iam, cluster_for=cluster_for, key=cluster_key,
                                                  tmp_path=tmp_path))
    sts_check = by_id(report)["sts.assume-role"]
    assert status == 1
    assert (sts_check["status"], sts_check["link"]) == ("fail", link), sts_check
    assert code in sts_check["message"] and message[:40] in sts_check["message"]
    assert word.lower() in f"{sts_check['message']} {sts_check['fix']}".lower(), sts_check
    assert [c["id"] for c in report["checks"] if c["status"] == "fail"] == ["sts.assume-role"]


@pytest.mark.parametrize(("answer", "said"), [
    pytest.param(lambda call: sts_error("InvalidIdentityToken", f"could not read {call.web_identity_token}"),
                 "could not read <token>", id="a-message-that-echoes-the-token"),
    pytest.param(lambda call: web.Response(status=200, content_type="text/xml", text=(
        "<AssumeRoleWithWebIdentityResponse><Credentials><SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        "</SecretAccessKey><Expiration>not a date")), "cannot read (ResponseParserError)",
                 id="a-body-that-does-not-parse"),
])
async def test_nothing_sts_sends_puts_a_secret_in_the_report(answer: Any, said: str, aws_env: dict[str, str], iam: Any,
                                                             cluster_for: Any, cluster_key: Issuer, sts: StsDouble,
                                                             tmp_path: Path) -> None:
    # The report is what gets pasted into a ticket.
    sts.fault = answer
    _, report = await run_live(await prepare(GOOD, iam=iam, cluster_for=cluster_for, key=cluster_key,
                                             tmp_path=tmp_path))
    text = json.dumps(report)
    token = sts.assume_calls[-1].web_identity_token
    assert token and token.split(".")[0][:24] not in text and token.split(".")[1][:24] not in text
    assert "wJalrXUtnFEMI" not in text
    finding = by_id(report)["sts.assume-role"]
    assert finding["status"] in ("fail", "warn")
    assert said in finding["message"], finding


async def test_access_denied_names_the_condition_that_rejects(aws_env: dict[str, str], iam: Any, cluster_for: Any,
                                                              cluster_key: Issuer, sts: StsDouble,
                                                              tmp_path: Path) -> None:
    scenario = next(s for s in scenarios() if s.name == "trust-sub-mismatch")
    sts.fail_with("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", status=403)
    _, report = await run_live(await prepare(scenario, iam=iam, cluster_for=cluster_for, key=cluster_key,
                                             tmp_path=tmp_path))
    sts_check = by_id(report)["sts.assume-role"]
    assert "system:serviceaccount:team-a:web" in sts_check["message"]
    assert 'admit "system:serviceaccount:team-a:app"' in sts_check["fix"]


async def test_throttling_is_no_verdict(aws_env: dict[str, str], iam: Any, cluster_for: Any, cluster_key: Issuer,
                                        sts: StsDouble, tmp_path: Path) -> None:
    sts.fail_with("Throttling", "Rate exceeded", status=400)
    status, report = await run_live(await prepare(GOOD, iam=iam, cluster_for=cluster_for, key=cluster_key,
                                                  tmp_path=tmp_path))
    assert status == 0
    assert by_id(report)["sts.assume-role"]["status"] == "warn"


async def test_the_token_is_minted_bound_to_the_pod_and_sts_gets_the_daemons_session_name(
        aws_env: dict[str, str], iam: Any, cluster_for: Any, cluster_key: Issuer, sts: StsDouble,
        tmp_path: Path) -> None:
    load_iam(GOOD, iam)
    double = await cluster_for(GOOD.issuer, cluster_key)
    load_cluster(GOOD, double)
    status, report = await run_live(live_argv(GOOD, double.write_kubeconfig(tmp_path / "kubeconfig")))
    assert status == 0, report
    [request] = double.token_requests
    pod = GOOD.yaml("pod.yaml")
    assert (request.namespace, request.service_account, request.status) == ("team-a", "app", 201)
    assert request.spec["audiences"] == ["sts.amazonaws.com"]
    assert request.spec["boundObjectRef"] == {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"],
                                              "uid": pod["metadata"]["uid"]}
    [call] = sts.assume_calls
    assert call.session_name == "team-a.app"  # what the daemon sends (sts.session_name_for)
    assert by_id(report)["token.subject"]["message"].endswith(f"bound to pod {pod['metadata']['name']}")


async def test_missing_live_objects_fail_their_link(aws_env: dict[str, str], iam: Any, cluster_for: Any,
                                                    cluster_key: Issuer, sts: StsDouble, tmp_path: Path) -> None:
    double = await cluster_for(GOOD.issuer, cluster_key)
    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig")
    status, report = await run_live(["--live", "--kubeconfig", str(kubeconfig), "--json", "--pod-name",
                                     "team-a/gone", "--role-arn", "arn:aws:iam::123456789012:role/team-a-app"])
    checks = by_id(report)
    assert status == 1
    assert checks["pod.read"]["status"] == "fail" and "does not exist" in checks["pod.read"]["message"]
    assert checks["trust-policy.read"]["status"] == "fail"
    assert "does not exist" in checks["trust-policy.read"]["message"]
    assert checks["sts.assume-role"]["status"] == "skip"
    assert sts.assume_calls == []

    double.create(GOOD.yaml("pod.yaml"))  # a pod whose ServiceAccount does not exist
    status, report = await run_live(["--live", "--kubeconfig", str(kubeconfig), "--json", "--pod-name",
                                     "team-a/app-7d4b9c-xk2lp"])
    checks = by_id(report)
    assert checks["service-account.read"]["status"] == "fail"
    assert "kubectl create serviceaccount -n team-a app" in checks["service-account.read"]["fix"]
    assert checks["token.request"]["status"] == "skip"


async def test_refused_permissions_are_warnings_naming_them(aws_env: dict[str, str], iam: Any, cluster_for: Any,
                                                            cluster_key: Issuer, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    double = await cluster_for(GOOD.issuer, cluster_key)
    load_cluster(GOOD, double)
    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig", token="not-the-right-token")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    status, report = await run_live(["--live", "--kubeconfig", str(kubeconfig), "--json", "--pod-name",
                                     "team-a/app-7d4b9c-xk2lp", "--role-arn", "arn:aws:iam::123456789012:role/team-a-app"])
    checks = by_id(report)
    assert checks["pod.read"]["status"] == "warn" and "get pods" in checks["pod.read"]["message"]
    assert checks["trust-policy.read"]["status"] == "warn"
    assert "no AWS credentials" in checks["trust-policy.read"]["message"]
    assert status == 0  # nothing was found broken; what could not be checked says so


async def test_an_unreachable_api_server_is_a_warning(aws_env: dict[str, str], iam: Any, cluster_for: Any,
                                                      cluster_key: Issuer, tmp_path: Path) -> None:
    double = await cluster_for(GOOD.issuer, cluster_key)
    kubeconfig = double.write_kubeconfig(tmp_path / "kubeconfig")
    await double.go_down()
    status, report = await run_live(["--live", "--kubeconfig", str(kubeconfig), "--json",
                                     "--service-account-name", "team-a/app"])
    read = by_id(report)["service-account.read"]
    assert read["status"] == "warn" and "cannot reach the API server" in read["message"]


async def test_an_unloadable_kubeconfig_is_exit_2(tmp_path: Path, aws_env: dict[str, str]) -> None:
    status, out, error = await cli.run(cli.parser().parse_args(
        ["--live", "--kubeconfig", str(tmp_path / "missing"), "--pod-name", "a/b"]), environ=dict(os.environ))
    assert (status, out) == (2, "")
    assert error.startswith("irsa-cache doctor: error: --kubeconfig") and "\n" not in error


async def test_the_installed_command_runs_live_with_endpoint_flags(moto_sts: MotoSts, sts: StsDouble, iam: Any,
                                                                   cluster_for: Any, cluster_key: Issuer,
                                                                   tmp_path: Path) -> None:
    """`irsa-cache doctor --live` as a process, endpoints from --sts-endpoint-url/--iam-endpoint-url."""
    load_iam(GOOD, iam)
    double = await cluster_for(GOOD.issuer, cluster_key)
    load_cluster(GOOD, double)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "doctor", *live_argv(GOOD, double.write_kubeconfig(tmp_path / "kubeconfig")),
        "--sts-endpoint-url", sts.url, "--iam-endpoint-url", moto_sts.url, "--region", "eu-west-1",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, (out.decode(), err.decode())
    report = json.loads(out)
    assert report["ok"] is True
    assert by_id(report)["sts.assume-role"]["status"] == "pass"
    assert len(sts.assume_calls) == 1
