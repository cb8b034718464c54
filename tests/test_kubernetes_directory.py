"""`--directory kubernetes` end to end: the real kubernetes-asyncio client against the
API double, real boto3 and moto, the daemon on loopback."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiohttp
import jwt
import pytest

from daemon import config
from daemon.embedded import DEMO_ACCOUNT, Issuer
from tests.conftest import (
    NODE, ROLE_A, ROLE_B, Cluster, StartK8sDaemon, boto3_caller_identity, eventually, fetch, metric, token_file,
)
from tests.k8s_double import K8sApiDouble, identity_for, pod, service_account
from tests.sts_double import StsDouble



async def test_boto3_gets_the_annotated_role_through_the_real_client(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, sts: StsDouble, tmp_path: Path
) -> None:
    cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-7d9f", "checkout")
    daemon = await start_k8s_daemon()

    arn = await boto3_caller_identity(daemon.credentials_url, token_file(tmp_path, cluster.token(checkout)), sts.url)

    assert arn == f"arn:aws:sts::{DEMO_ACCOUNT}:assumed-role/app-a/shop.checkout"


async def test_readiness_follows_the_informers(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await start_k8s_daemon()
    readyz = f"http://{daemon.metrics_listen}/readyz"
    async with http.get(readyz) as response:
        assert response.status == 200
    assert k8s.count("list", "/api/v1/serviceaccounts") == 1
    assert k8s.watch_calls("/api/v1/pods")[0].field_selector == f"spec.nodeName={NODE}"


async def test_a_changed_annotation_takes_effect_and_old_credentials_are_never_served_again(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    account = cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    daemon = await start_k8s_daemon()
    token = cluster.token(checkout)
    before = await fetch(http, daemon, token)
    assert before.status == 200

    account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] = ROLE_B
    k8s.update(account)
    await eventually(lambda: len(daemon.cache) == 0)

    after = await fetch(http, daemon, token)
    assert after.status == 200
    assert after.body["AccessKeyId"] != before.body["AccessKeyId"]
    assert [call.role_arn for call in sts.assume_calls] == [ROLE_A, ROLE_B]
    for _ in range(5):  # the old credentials never come back
        assert (await fetch(http, daemon, token)).body["AccessKeyId"] == after.body["AccessKeyId"]


async def test_a_removed_annotation_is_a_403_naming_it(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, http: aiohttp.ClientSession
) -> None:
    account = cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    daemon = await start_k8s_daemon()
    token = cluster.token(checkout)
    assert (await fetch(http, daemon, token)).status == 200

    del account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    k8s.update(account)
    await eventually(lambda: len(daemon.cache) == 0)

    answer = await fetch(http, daemon, token)
    assert answer.status == 403
    assert answer.body["code"] == "no_role_annotation"
    assert "eks.amazonaws.com/role-arn" in answer.body["message"] and "shop/checkout" in answer.body["message"]


async def test_a_custom_annotation_prefix(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, http: aiohttp.ClientSession
) -> None:
    k8s.create(service_account("shop", "checkout", annotations={"irsa.example.com/role-arn": ROLE_B}))
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    daemon = await start_k8s_daemon("--annotation-prefix", "irsa.example.com")

    assert (await fetch(http, daemon, cluster.token(checkout))).status == 200


@pytest.mark.parametrize(
    ("change", "code"),
    [
        pytest.param("delete", "pod_not_on_node", id="pod-deleted"),
        pytest.param("other-node", "pod_on_other_node", id="pod-on-other-node"),
        pytest.param("other-uid", "pod_uid_mismatch", id="pod-recreated-with-another-uid"),
        pytest.param("succeeded", "pod_not_live", id="pod-finished"),
    ],
)
async def test_a_token_whose_pod_is_not_live_here_is_refused(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, sts: StsDouble,
    http: aiohttp.ClientSession, change: str, code: str,
) -> None:
    cluster.account("shop", "checkout", ROLE_A)
    victim = cluster.pod("shop", "checkout-1", "checkout")
    sibling = cluster.pod("shop", "checkout-2", "checkout")
    daemon = await start_k8s_daemon()
    stolen = cluster.token(victim)
    assert (await fetch(http, daemon, stolen)).status == 200
    again = await fetch(http, daemon, stolen)  # by the shortcut (no Server header): it checks the pod too
    assert again.status == 200 and "Server" not in again.headers

    if change == "delete":
        k8s.delete(victim)
    elif change == "other-node":  # the token is presented on a node its pod does not run on
        k8s.delete(victim)
        k8s.create(pod("shop", "checkout-1", "node-b", "checkout", uid=victim["metadata"]["uid"]))
    elif change == "other-uid":
        k8s.delete(victim)
        k8s.create(pod("shop", "checkout-1", NODE, "checkout"))
    else:
        victim["status"]["phase"] = "Succeeded"
        k8s.update(victim)
    answer = await fetch(http, daemon, stolen)
    async with asyncio.timeout(10):  # until the pod informer has the change
        while answer.status == 200:
            await asyncio.sleep(0.02)
            answer = await fetch(http, daemon, stolen)
    assert answer.status == 403, answer.body
    assert answer.body["code"] == code
    assert "shop/checkout-1" in answer.body["message"]
    # The same service account's other live pod is still served, from the same entry.
    assert (await fetch(http, daemon, cluster.token(sibling))).status == 200
    assert len(sts.assume_calls) == 1


async def test_a_pod_too_new_for_the_informer_is_read_once_directly(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, http: aiohttp.ClientSession
) -> None:
    cluster.account("shop", "checkout", ROLE_A)
    daemon = await start_k8s_daemon()
    k8s.drop_watches(abrupt=True)  # the informer is blind for a moment
    newborn = cluster.pod("shop", "checkout-new", "checkout")

    answer = await fetch(http, daemon, cluster.token(newborn))

    assert answer.status == 200
    assert k8s.count("get", "/api/v1/namespaces/shop/pods/checkout-new") <= 1


async def test_informers_recover_from_dropped_watches_and_410_without_losing_events(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    account = cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    daemon = await start_k8s_daemon()
    token = cluster.token(checkout)
    assert (await fetch(http, daemon, token)).status == 200
    lists_before = k8s.count("list", "/api/v1/serviceaccounts")

    expired_before = metric("irsa_cache_watch_restarts_total", informer="serviceaccounts", reason="expired")

    # A watch that ends cleanly is resumed from its resourceVersion; if the server's history
    # no longer reaches back that far (410 Gone), the informer lists again. (A watch ended
    # within a second, with no event, would be a failure instead: a spinning server.)
    await asyncio.sleep(1.1)
    k8s.drop_watches(abrupt=False)  # no await until compact(): the informer cannot reconnect in between
    account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] = ROLE_B
    k8s.update(account)
    k8s.compact()
    await eventually(lambda: len(daemon.cache) == 0, seconds=20)
    assert (await fetch(http, daemon, token)).status == 200
    assert sts.assume_calls[-1].role_arn == ROLE_B
    assert metric("irsa_cache_watch_restarts_total", informer="serviceaccounts", reason="expired") > expired_before

    # A watch cut mid-stream while changes happen: backed off, listed again, nothing lost.
    await k8s.go_down()
    account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] = ROLE_A
    k8s.update(account)
    await k8s.come_up()
    await eventually(lambda: len(daemon.cache) == 0, seconds=40)
    assert (await fetch(http, daemon, token)).status == 200
    assert sts.assume_calls[-1].role_arn == ROLE_A
    assert k8s.count("list", "/api/v1/serviceaccounts") > lists_before
    assert metric("irsa_cache_watch_restarts_total", informer="serviceaccounts", reason="error") >= 1


async def test_during_an_api_server_outage_cached_identities_are_served_and_readiness_says_so(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, http: aiohttp.ClientSession
) -> None:
    cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    daemon = await start_k8s_daemon()
    token = cluster.token(checkout)
    served = await fetch(http, daemon, token)
    readyz = f"http://{daemon.metrics_listen}/readyz"

    await k8s.go_down()
    k8s.drop_watches()

    async def not_ready() -> bool:
        async with http.get(readyz) as response:
            return response.status == 503

    async with asyncio.timeout(20):
        while not await not_ready():
            await asyncio.sleep(0.1)
    again = await fetch(http, daemon, token)
    assert again.status == 200 and again.body["AccessKeyId"] == served.body["AccessKeyId"]
    assert metric("irsa_cache_directory_ready") == 0

    await k8s.come_up()
    async with asyncio.timeout(40):
        while await not_ready():
            await asyncio.sleep(0.1)
    assert metric("irsa_cache_directory_ready") == 1


async def test_a_rotated_key_is_trusted_after_one_refetch(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    daemon = await start_k8s_daemon()
    rotated = Issuer(url=issuer.url)
    k8s.rotate_keys({"keys": [*issuer.jwks()["keys"], *rotated.jwks()["keys"]]})
    jwks_reads = k8s.count("get", "/openid/v1/jwks")

    meta = checkout["metadata"]
    token = rotated.mint("system:serviceaccount:shop:checkout", pod_name=meta["name"], pod_uid=meta["uid"])
    assert (await fetch(http, daemon, token)).status == 200
    assert k8s.count("get", "/openid/v1/jwks") == jwks_reads + 1

    # A flood of unknown key ids costs no more fetches within the refetch interval.
    rng = random.Random(7)
    bogus = [jwt.encode({"sub": "x"}, issuer.private_key, algorithm="RS256", headers={"kid": f"{rng.getrandbits(64):x}"})
             for _ in range(1000)]
    answers = await asyncio.gather(*(fetch(http, daemon, t) for t in bogus))
    assert {a.body["code"] for a in answers} == {"unknown_key"}
    assert k8s.count("get", "/openid/v1/jwks") <= jwks_reads + 2


async def test_token_review_mode_serves_live_pods_and_refuses_the_rest(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    account = cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    elsewhere = cluster.pod("shop", "checkout-2", "checkout", node="node-b")
    token, far_token = cluster.token(checkout), cluster.token(elsewhere)
    k8s.token_reviews = {token: identity_for(account, checkout), far_token: identity_for(account, elsewhere)}
    daemon = await start_k8s_daemon("--token-review")

    first = await fetch(http, daemon, token)
    second = await fetch(http, daemon, token)
    assert first.status == second.status == 200
    assert len(k8s.token_review_requests) == 1  # the review is cached per token until exp
    assert list(k8s.token_review_requests[0].audiences) == ["sts.amazonaws.com"]

    far = await fetch(http, daemon, far_token)
    assert far.status == 403 and far.body["code"] == "pod_on_other_node"

    unknown = await fetch(http, daemon, cluster.issuer.mint("system:serviceaccount:shop:checkout"))
    assert unknown.status == 401 and unknown.body["code"] == "token_review_rejected"

    k8s.delete(checkout)
    await asyncio.sleep(0.5)
    gone = await fetch(http, daemon, token)
    assert gone.status == 403 and gone.body["code"] == "pod_not_on_node"
    assert len(sts.assume_calls) == 1


async def test_token_review_that_names_no_audience_is_a_rejection(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, sts: StsDouble, http: aiohttp.ClientSession
) -> None:
    """An authenticator that is not audience-aware says `authenticated: true` and names no
    audience; a token minted for any audience would then pass."""
    cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    other_audience = cluster.token(checkout, audience="vault")
    k8s.token_reviews = lambda token, audiences: {  # type: ignore[assignment]
        "authenticated": True, "audiences": [],
        "user": {"username": "system:serviceaccount:shop:checkout",
                 "extra": {"authentication.kubernetes.io/pod-name": [checkout["metadata"]["name"]],
                           "authentication.kubernetes.io/pod-uid": [checkout["metadata"]["uid"]]}},
    }
    daemon = await start_k8s_daemon("--token-review")

    answer = await fetch(http, daemon, other_audience)

    assert answer.status == 401 and answer.body["code"] == "token_review_rejected"
    assert "sts.amazonaws.com" in answer.body["message"]
    assert sts.assume_calls == []


async def test_token_reviews_remembered_stay_bounded_when_none_has_expired(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past its bound, the memory of reviews forgets its oldest, even when every token in
    it is still valid: the first token is reviewed again, not kept for ever."""
    monkeypatch.setattr(config, "VERIFIED_TOKENS_MAX", 8)
    account = cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    tokens = [cluster.token(checkout, jti=f"t{i}") for i in range(12)]
    k8s.token_reviews = {token: identity_for(account, checkout) for token in tokens}
    daemon = await start_k8s_daemon("--token-review")

    for token in tokens:
        assert (await fetch(http, daemon, token)).status == 200
    assert len(k8s.token_review_requests) == 12
    assert (await fetch(http, daemon, tokens[0])).status == 200

    assert len(k8s.token_review_requests) == 13


@pytest.mark.parametrize("shape", ["unsigned", "alg_none", "hs256", "not_a_jwt"])
async def test_tokens_that_are_plainly_forged_never_reach_the_api_server(
    shape: str, start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, http: aiohttp.ClientSession
) -> None:
    cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    genuine = cluster.token(checkout)
    header, payload, _ = genuine.split(".")
    forged = {
        "unsigned": f"{header}.{payload}.",
        "alg_none": jwt.encode(jwt.decode(genuine, options={"verify_signature": False}), key=None, algorithm="none"),
        "hs256": jwt.encode(jwt.decode(genuine, options={"verify_signature": False}), "secret-" * 6, algorithm="HS256"),
        "not_a_jwt": "x" * 900,
    }[shape]
    daemon = await start_k8s_daemon("--token-review")

    answers = [await fetch(http, daemon, forged) for _ in range(3)]

    assert {(a.status, a.body["code"]) for a in answers} == {(401, "malformed_token")}
    assert k8s.token_review_requests == []


async def test_token_reviews_under_way_are_capped(
    start_k8s_daemon: StartK8sDaemon, cluster: Cluster, k8s: K8sApiDouble, http: aiohttp.ClientSession
) -> None:
    """A flood of distinct well-formed tokens holds at most 16 reviews open against a slow
    API server; the rest are told to retry (503) instead of piling onto it."""
    cluster.account("shop", "checkout", ROLE_A)
    checkout = cluster.pod("shop", "checkout-1", "checkout")
    release = asyncio.Event()
    open_reviews = 0
    most_open = 0

    async def slow_reviews(request: object, call: object) -> None:
        nonlocal open_reviews, most_open
        if getattr(call, "path", "").endswith("/tokenreviews"):
            open_reviews += 1
            most_open = max(most_open, open_reviews)
            try:
                await asyncio.wait_for(release.wait(), 5)
            finally:
                open_reviews -= 1
        return None

    daemon = await start_k8s_daemon("--token-review")
    k8s.fault = slow_reviews
    tokens = [cluster.token(checkout, jti=f"t{i}") for i in range(40)]

    pending = [asyncio.ensure_future(fetch(http, daemon, token)) for token in tokens]
    await eventually(lambda: open_reviews == config.TOKEN_REVIEWS_AT_ONCE)
    await asyncio.sleep(0.2)
    release.set()
    answers = await asyncio.gather(*pending)

    assert most_open == config.TOKEN_REVIEWS_AT_ONCE
    refused = [a for a in answers if a.status == 503]
    assert len(refused) == 40 - config.TOKEN_REVIEWS_AT_ONCE
    assert {a.body["code"] for a in refused} == {"directory_unavailable"}
