"""The API double's TokenRequest, through the real kubernetes-asyncio client: what it
answers and the token it mints (verified with the daemon's own verifier)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from daemon import config
from daemon.embedded import Issuer
from daemon.tokens import TokenVerifier
from tests.k8s_double import K8sApiDouble, pod, service_account

ISSUER = "https://oidc.k8s-double.test/id/TOKENREQUEST"


class Keys:
    description = "the double's key set"

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    async def fetch(self) -> dict[str, Any]:
        return self.document


@pytest.fixture(scope="module")
def key() -> Issuer:
    return Issuer()


@pytest.fixture
async def api(key: Issuer) -> AsyncIterator[tuple[K8sApiDouble, client.CoreV1Api]]:
    double = await K8sApiDouble(issuer=ISSUER, jwks=key.jwks(), minter=key).start()
    async with client.ApiClient(double.client_configuration()) as api_client:
        yield double, client.CoreV1Api(api_client)
    await double.stop()


def request(audiences: list[str] | None = None, seconds: int | None = 3600, bound: dict[str, Any] | None = None) -> dict:
    spec: dict[str, Any] = {}
    if audiences is not None:
        spec["audiences"] = audiences
    if seconds is not None:
        spec["expirationSeconds"] = seconds
    if bound is not None:
        spec["boundObjectRef"] = bound
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


async def create(core: client.CoreV1Api, namespace: str, name: str, body: dict) -> dict[str, Any]:
    response = await core.create_namespaced_service_account_token(name, namespace, body, _preload_content=False)
    text = await response.read()
    if response.status != 201:
        raise ApiException(status=response.status, reason=text.decode())
    return json.loads(text)  # type: ignore[no-any-return]


async def test_a_pod_bound_token_verifies_and_names_the_pod(api: tuple[K8sApiDouble, client.CoreV1Api],
                                                            key: Issuer) -> None:
    double, core = api
    account = double.create(service_account("team-a", "app"))
    running = double.create(pod("team-a", "app-1", "node-a", "app"))
    bound = {"kind": "Pod", "apiVersion": "v1", "name": "app-1", "uid": running["metadata"]["uid"]}
    answer = await create(core, "team-a", "app", request(["sts.amazonaws.com"], 600, bound))

    assert answer["kind"] == "TokenRequest" and answer["spec"]["audiences"] == ["sts.amazonaws.com"]
    assert answer["status"]["expirationTimestamp"].endswith("Z")
    verifier = TokenVerifier(issuer=ISSUER, audience="sts.amazonaws.com", key_source=Keys(key.jwks()),
                             clock=lambda: time.time(), leeway_seconds=config.TOKEN_LEEWAY_SECONDS,
                             refetch_min_interval_seconds=30, max_verified=10)
    await verifier.load_keys()
    identity = (await verifier.verify(answer["status"]["token"])).identity
    assert identity.subject == "system:serviceaccount:team-a:app"
    assert (identity.pod_name, identity.pod_uid) == ("app-1", running["metadata"]["uid"])
    claims = jwt.decode(answer["status"]["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600
    assert claims["kubernetes.io"]["serviceaccount"]["uid"] == account["metadata"]["uid"]
    [call] = double.token_requests
    assert (call.namespace, call.service_account, call.status) == ("team-a", "app", 201)

    # TokenReview knows the token it minted, as the real API server would.
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": answer["status"]["token"], "audiences": ["sts.amazonaws.com"]}}
    async with client.ApiClient(double.client_configuration()) as api_client:
        response = await client.AuthenticationV1Api(api_client).create_token_review(review, _preload_content=False)
        status = json.loads(await response.read())["status"]
    assert status["authenticated"] is True
    assert status["user"]["username"] == "system:serviceaccount:team-a:app"
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["app-1"]


async def test_audiences_and_lifetime_default(api: tuple[K8sApiDouble, client.CoreV1Api]) -> None:
    double, core = api
    double.create(service_account("team-a", "app"))
    answer = await create(core, "team-a", "app", request(seconds=None))
    assert answer["spec"]["audiences"] == [ISSUER]
    assert answer["spec"]["expirationSeconds"] == 3600


@pytest.mark.parametrize(("body", "status", "words"), [
    pytest.param(request(["sts.amazonaws.com"], 599), 422, "may not specify a duration less than 10 minutes",
                 id="under-10-minutes"),
    pytest.param(request(bound={"kind": "Pod", "apiVersion": "v1", "name": "gone"}), 404, 'pods "gone" not found',
                 id="pod-missing"),
    pytest.param(request(bound={"kind": "Pod", "apiVersion": "v1", "name": "app-1", "uid": "stale"}), 409,
                 "the UID in the bound object reference (stale) does not match the UID in record", id="uid-conflict"),
    pytest.param(request(bound={"kind": "Pod", "apiVersion": "v1", "name": "web-1"}), 400,
                 'cannot bind token for serviceaccount "app" to pod running with different serviceaccount name.',
                 id="other-account-pod"),
    pytest.param(request(bound={"kind": "ConfigMap", "apiVersion": "v1", "name": "x"}), 400,
                 "cannot bind token to object of type ConfigMap", id="unbindable-kind"),
])
async def test_refusals_are_the_api_servers(api: tuple[K8sApiDouble, client.CoreV1Api], body: dict, status: int,
                                            words: str) -> None:
    double, core = api
    double.create(service_account("team-a", "app"))
    double.create(pod("team-a", "app-1", "node-a", "app"))
    double.create(pod("team-a", "web-1", "node-a", "web"))
    with pytest.raises(ApiException) as refused:
        await create(core, "team-a", "app", body)
    assert refused.value.status == status
    assert words in json.loads(refused.value.reason)["message"]


async def test_a_missing_service_account_is_404(api: tuple[K8sApiDouble, client.CoreV1Api]) -> None:
    _, core = api
    with pytest.raises(ApiException) as refused:
        await create(core, "team-a", "ghost", request())
    assert refused.value.status == 404
    assert json.loads(refused.value.reason)["message"] == 'serviceaccounts "ghost" not found'
