"""The fault suite: the real daemon against upstreams that misbehave.

The API double answers text and HTML errors, a Status where a watch event belongs,
lines that are not events, nothing at all, or refuses connections; STS answers
5xx, hangs, refuses, or sends truncated, garbled or garbage bodies. For each: the
daemon stays up, known identities are served, a new one gets a clear JSON error, and
recovery is automatic once the upstream heals. Secrets never reach the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from daemon import config
from daemon.__main__ import build_parser
from daemon.app import RunningDaemon
from daemon.models import CacheKey
from daemon.embedded import Background, Issuer, free_port
from tests.conftest import (
    FakeClock, ROLE_A, ROLE_B, SUBJECT_A, SUBJECT_B, Cluster, StartDaemon, StartK8sDaemon, eventually, fetch, metric,
)
from tests.k8s_double import (Fault, K8sApiDouble, plain_answer, pod, service_account, silence, status_response,
                              watch_lines)
from tests.sts_double import StsDouble, sts_error

BOUND_SECONDS = 20.0
# Deadlines short enough for a test, in the ratios of the defaults.
FAST_API = config.ApiTimeouts(list_seconds=2.0, request_seconds=1.0, connect_seconds=1.0, watch_seconds=30,
                              watch_silence_seconds=1.0, backoff_max_seconds=0.5)


def fast_api(settings: config.Settings) -> config.Settings:
    directory = dataclasses.replace(settings.directory, timeouts=FAST_API, absent_pod_seconds=2.0)
    return dataclasses.replace(settings, directory=directory)


def alive(daemon: RunningDaemon) -> bool:
    """No root task has ended with an error, and those that never end still run (the
    signing-key loader ends once loaded; the status files end at once without a directory)."""
    ended_badly = any(task.done() and (task.cancelled() or task.exception() is not None) for task in daemon.tasks)
    running = {task.get_name() for task in daemon.tasks if not task.done()}
    return not ended_badly and {"directory", "cache maintenance"} <= running


async def readiness(http: aiohttp.ClientSession, daemon: RunningDaemon) -> tuple[int, str]:
    async with http.get(f"http://{daemon.metrics_listen}/readyz") as response:
        return response.status, await response.text()


# --- the API server misbehaving ---

STATUS_500 = (b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
              b'"message":"etcdserver: request timed out","reason":"InternalError","code":500}\n')

API_FAULTS = [
    # (fault, does it fail lists too, so that readiness must say so)
    pytest.param(lambda: plain_answer(503, "<html><body><h1>503 Service Unavailable</h1></body></html>"), True,
                 id="html-503-from-a-proxy"),
    pytest.param(lambda: plain_answer(502, "Bad Gateway", "text/plain"), True, id="text-502"),
    pytest.param(lambda: plain_answer(200, "<html>login page</html>"), True, id="html-200"),
    pytest.param(lambda: plain_answer(200, '{"items": "not a list"}', "application/json"), True,
                 id="json-that-is-not-a-list"),
    pytest.param(lambda: watch_lines(STATUS_500), False, id="status-instead-of-event"),
    pytest.param(lambda: watch_lines(b"<html>oops</html>\n"), False, id="line-not-json"),
    pytest.param(lambda: watch_lines(b"[1, 2, 3]\n", b"null\n"), False, id="json-not-an-event"),
    pytest.param(lambda: watch_lines(b'{"type": "ADDED", "object": {"metadata": {}}}\n',
                                     b'{"type": "EXPLODED", "object": {}}\n'), False, id="nameless-and-unknown-events"),
    pytest.param(lambda: watch_lines(b'{"type": "ADDED", "object": {"metadata": {"name": "x", "namespace": 7,'
                                     b' "annotations": ["not", "a", "map"]}, "spec": "nope", "status": 5}}\n'),
                 False, id="object-with-wrong-types"),
    pytest.param(lambda: silence(), True, id="silence"),
    pytest.param(lambda: silence(after_headers=True), True, id="silence-after-headers"),
]


@pytest.mark.parametrize(("make_fault", "lists_fail"), API_FAULTS)
async def test_the_daemon_outlives_a_misbehaving_api_server(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, http: aiohttp.ClientSession,
    make_fault: Callable[[], Fault], lists_fail: bool,
) -> None:
    cluster.account("team-a", "app", ROLE_A)
    cluster.account("team-b", "app", ROLE_B)
    known = cluster.pod("team-a", "app-1", "app")
    daemon = await start_k8s_daemon(adjust=fast_api)
    assert (await fetch(http, daemon, cluster.token(known))).status == 200
    restarts = metric("irsa_cache_watch_restarts_total", informer="pods", reason="error") + metric(
        "irsa_cache_watch_restarts_total", informer="pods", reason="silent")

    k8s.fault = make_fault()
    k8s.drop_watches()
    await eventually(lambda: metric("irsa_cache_watch_restarts_total", informer="pods", reason="error") + metric(
        "irsa_cache_watch_restarts_total", informer="pods", reason="silent") >= restarts + 2, seconds=BOUND_SECONDS)

    assert alive(daemon)
    answer = await fetch(http, daemon, cluster.token(known))  # what the informers last saw still serves
    assert answer.status == 200, answer.body
    if lists_fail:
        status, text = await readiness(http, daemon)
        assert status == 503 and "informer" in text, text
        # A pod the informer never saw: its direct read fails too, and says so.
        newcomer = k8s.create(pod("team-b", "new-1", "node-a", "app"))
        refused = await asyncio.wait_for(fetch(http, daemon, cluster.token(newcomer)), BOUND_SECONDS)
        assert refused.status == 503 and refused.body["code"] == "directory_unavailable", refused.body
        assert "cannot read pod team-b/new-1" in refused.body["message"]

    k8s.fault = None  # recovery needs nothing but time
    k8s.update(service_account("team-a", "app", ROLE_B))
    await eventually(lambda: len(daemon.cache) == 0, seconds=BOUND_SECONDS)  # the role change arrived
    await eventually(lambda: daemon.verifier.ready and alive(daemon), seconds=BOUND_SECONDS)
    await until_ready(http, daemon)
    assert alive(daemon)


async def test_an_api_server_that_expires_every_watch_at_once_is_not_spun_against(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, http: aiohttp.ClientSession,
) -> None:
    cluster.account("team-a", "app", ROLE_A)
    known = cluster.pod("team-a", "app-1", "app")
    daemon = await start_k8s_daemon(adjust=fast_api)

    async def expire_watches(request: web.Request, call: object) -> web.StreamResponse | None:
        if getattr(call, "verb", None) == "watch":
            return status_response(410, "Expired", "too old resource version: 1 (2)")
        return None

    lists = k8s.count("list")
    k8s.fault = expire_watches
    k8s.drop_watches()
    await asyncio.sleep(3.0)

    # Each informer lists again after each 410; at once, every time, would be hundreds a second.
    assert k8s.count("list") - lists < 40, k8s.count("list") - lists
    assert alive(daemon)
    assert (await fetch(http, daemon, cluster.token(known))).status == 200


async def test_a_black_holed_api_server_is_noticed_and_left_behind_on_recovery(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, http: aiohttp.ClientSession,
) -> None:
    cluster.account("team-a", "app", ROLE_A)
    known = cluster.pod("team-a", "app-1", "app")
    daemon = await start_k8s_daemon(adjust=fast_api)
    assert (await fetch(http, daemon, cluster.token(known))).status == 200

    k8s.fault = silence(after_headers=True)  # open watches stay open, and silent
    await eventually(lambda: metric("irsa_cache_watch_restarts_total", informer="serviceaccounts", reason="silent")
                     >= 1, seconds=BOUND_SECONDS)
    for _ in range(100):  # bounded: until the relist, too, has timed out
        status, text = await readiness(http, daemon)
        if "did not answer in time" in text:
            break
        await asyncio.sleep(0.1)
    assert status == 503 and "did not answer in time" in text, text
    assert metric("irsa_cache_api_server_available") == 0  # the control plane's outage, not ours
    assert metric("irsa_cache_directory_ready") == 0

    k8s.fault = None
    k8s.update(service_account("team-a", "app", ROLE_A.replace("app-a", "app-a2")))
    await eventually(lambda: len(daemon.cache) == 0, seconds=10)  # applied within seconds of recovery
    answer = await fetch(http, daemon, cluster.token(known))
    assert answer.status == 200, answer.body
    await until_ready(http, daemon)


async def until_ready(http: aiohttp.ClientSession, daemon: RunningDaemon) -> None:
    """Both informers back (each leaves its own backoff), within a bound."""
    for _ in range(100):
        status, text = await readiness(http, daemon)
        if status == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still not ready after 10 s: {text}")


async def test_a_forbidden_list_is_this_daemons_problem_not_the_control_planes(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, http: aiohttp.ClientSession,
) -> None:
    from tests.k8s_double import status_response

    cluster.account("team-a", "app", ROLE_A)
    daemon = await start_k8s_daemon(adjust=fast_api)

    async def forbid_pods(request: web.Request, call: object) -> web.StreamResponse | None:
        if "/pods" in request.path:
            return status_response(403, "Forbidden", 'pods is forbidden: User "system:serviceaccount:irsa-cache:'
                                   'irsa-cache" cannot list resource "pods" in API group "" at the cluster scope')
        return None

    k8s.fault = forbid_pods
    k8s.drop_watches()
    for _ in range(100):  # bounded: until the relist has been refused, and the other informer is back
        status, text = await readiness(http, daemon)
        if "403" in text and "serviceaccounts" not in text:
            break
        await asyncio.sleep(0.1)
    assert status == 503 and "cannot list resource" in text, text
    assert metric("irsa_cache_api_server_available") == 1  # the server answers: the RBAC is ours to fix
    assert alive(daemon)


async def test_an_api_server_down_at_start_is_waited_for_not_a_crash(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, http: aiohttp.ClientSession,
) -> None:
    cluster.account("team-a", "app", ROLE_A)
    known = cluster.pod("team-a", "app-1", "app")
    k8s.fault = plain_answer(503, "<html>starting</html>")
    started = asyncio.get_running_loop().time()
    start = asyncio.create_task(start_k8s_daemon(adjust=fast_api))
    daemon = await asyncio.wait_for(start, BOUND_SECONDS)  # serves after its sync wait, not ready

    assert asyncio.get_running_loop().time() - started >= 5  # it waited for the informers first
    status, text = await readiness(http, daemon)
    assert status == 503 and "signing keys not loaded" in text and "informer" in text, text
    refused = await fetch(http, daemon, cluster.token(known))
    assert refused.status == 503 and refused.body["code"] == "keys_unavailable", refused.body

    k8s.fault = None
    await eventually(lambda: daemon.verifier.ready, seconds=BOUND_SECONDS)
    for _ in range(100):  # bounded
        answer = await fetch(http, daemon, cluster.token(known))
        if answer.status == 200:
            break
        await asyncio.sleep(0.1)
    assert answer.status == 200, answer.body


async def test_a_pod_not_on_this_node_costs_one_api_read_however_often_it_asks(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, http: aiohttp.ClientSession,
) -> None:
    cluster.account("team-a", "app", ROLE_A)
    elsewhere = cluster.pod("team-a", "app-9", "app", node="node-b")
    daemon = await start_k8s_daemon(adjust=fast_api)
    token = cluster.token(elsewhere)
    reads = k8s.count("get", "/api/v1/namespaces/team-a/pods/app-9")

    answers = await asyncio.gather(*(fetch(http, daemon, token) for _ in range(60)))

    assert {(a.status, a.body["code"]) for a in answers} == {(403, "pod_on_other_node")}
    assert k8s.count("get", "/api/v1/namespaces/team-a/pods/app-9") - reads == 1  # one read, shared
    remembered = metric("irsa_cache_refusals_remembered_total", kind="pod_absent")
    assert (await fetch(http, daemon, token)).body["code"] == "pod_on_other_node"
    assert metric("irsa_cache_refusals_remembered_total", kind="pod_absent") == remembered + 1
    assert k8s.count("get", "/api/v1/namespaces/team-a/pods/app-9") - reads == 1

    # The pod moves here (as a recreated pod would): the informer's sight of it serves it at once.
    moved = dict(elsewhere, spec=dict(elsewhere["spec"], nodeName="node-a"))
    k8s.update(moved)
    await eventually(lambda: ("team-a", "app-9") in daemon.directory.pods.store, seconds=BOUND_SECONDS)  # type: ignore[attr-defined]
    answer = await fetch(http, daemon, token)
    assert answer.status == 200, answer.body


async def test_pods_with_fields_of_the_wrong_type_are_refused_and_disturb_nothing_else(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, http: aiohttp.ClientSession,
) -> None:
    """A broken API server (or a conversion webhook gone wrong) sends a pod whose phase,
    node or uid is not a string: that pod is refused by name, and the informer, its
    store and the live-pod counts that decide refreshes go on as if it were not there."""
    cluster.account("team-a", "app", ROLE_A)
    cluster.account("team-a", "odd", ROLE_B)
    odd = cluster.pod("team-a", "odd-1", "odd")
    k8s.update(dict(odd, status={"phase": ["Running"]}))  # listed at start
    first = cluster.pod("team-a", "app-1", "app")
    daemon = await start_k8s_daemon(adjust=fast_api)
    odd_twin = cluster.pod("team-a", "odd-2", "odd")
    k8s.update(dict(odd_twin, spec=dict(odd_twin["spec"], nodeName=["node-a"]),
                    metadata=dict(odd_twin["metadata"], uid={"not": "a string"})))  # seen through the watch
    second = cluster.pod("team-a", "app-2", "app")  # after the odd ones, on the same watch
    await eventually(lambda: ("team-a", "app-2") in daemon.directory.pods.store, seconds=BOUND_SECONDS)  # type: ignore[attr-defined]

    refused = await fetch(http, daemon, cluster.token(odd))
    assert refused.status == 403 and refused.body["code"] == "pod_not_live", refused.body
    twin = await fetch(http, daemon, cluster.token(odd_twin))
    assert twin.status == 403 and twin.body["code"] == "pod_on_other_node", twin.body
    for pod_ in (first, second):
        assert (await fetch(http, daemon, cluster.token(pod_))).status == 200
    assert (await readiness(http, daemon))[0] == 200 and alive(daemon)
    in_use = daemon.directory.in_use  # type: ignore[attr-defined]
    key = CacheKey(ROLE_A, cluster.issuer.url, SUBJECT_A, "sts.amazonaws.com")
    assert in_use(key)
    k8s.delete(first)
    k8s.delete(second)
    await eventually(lambda: not in_use(key), seconds=BOUND_SECONDS)


async def test_a_failing_change_handler_leaves_the_informer_and_its_store_whole(
    k8s: K8sApiDouble, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in what reacts to a change must not stop the informer: its store is the
    truth the directory serves from, and the changes after the bad one still arrive."""
    from kubernetes_asyncio import client

    from daemon.directory.informer import Informer

    k8s.create(service_account("team-a", "bug-1", ROLE_A))
    k8s.create(service_account("team-a", "fine-1", ROLE_A))
    seen: list[str] = []

    def on_change(old: dict | None, new: dict | None) -> None:
        name = (new or old or {})["metadata"]["name"]
        if name.startswith("bug-"):
            raise KeyError("a bug in the handler")
        seen.append(name)

    async with client.ApiClient(k8s.client_configuration()) as api:
        informer = Informer(name="serviceaccounts", list_call=client.CoreV1Api(api).list_service_account_for_all_namespaces,
                            on_change=on_change, timeouts=FAST_API)
        running = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(informer.synced.wait(), BOUND_SECONDS)
            k8s.create(service_account("team-a", "bug-2", ROLE_A))
            k8s.create(service_account("team-a", "fine-2", ROLE_A))
            await eventually(lambda: "fine-2" in seen, seconds=BOUND_SECONDS)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    assert set(informer.store) == {("team-a", n) for n in ("bug-1", "fine-1", "bug-2", "fine-2")}
    assert sorted(seen) == ["fine-1", "fine-2"] and informer.healthy
    assert k8s.count("list", "/api/v1/serviceaccounts") == 1  # no relist: the bug is not the server's
    assert "team-a/bug-2 failed (a bug in irsa-cache)" in caplog.text


# --- STS misbehaving ---

TRUNCATED = ('<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
             "<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAFAULT</AccessKeyId>"
             "<SecretAccessKey>SECRETzFAULTzKEYz0123456789")


def answering(status: int, body: str, content_type: str = "text/xml") -> Callable[[object], web.Response]:
    return lambda call: web.Response(status=status, text=body, content_type=content_type)


STS_FAULTS = [
    pytest.param(lambda sts: setattr(sts, "fault", lambda call: sts_error("InternalFailure", "An internal error "
                 "occurred", status=500, kind="Receiver")), 502, "InternalFailure", id="http-500"),
    pytest.param(lambda sts: setattr(sts, "fault", lambda call: sts_error("ServiceUnavailable", "Service "
                 "unavailable", status=503, kind="Receiver")), 502, "ServiceUnavailable", id="http-503"),
    pytest.param(lambda sts: setattr(sts, "fault", answering(502, "<html>bad gateway</html>", "text/html")), 502,
                 "502", id="html-502-from-a-proxy"),
    pytest.param(lambda sts: setattr(sts, "fault", answering(200, TRUNCATED)), 502, "does not parse",
                 id="truncated-xml"),
    pytest.param(lambda sts: setattr(sts, "fault", answering(200, TRUNCATED.replace("<", "&lt;") + "</x>")), 502,
                 "does not parse", id="garbled-xml"),
    pytest.param(lambda sts: setattr(sts, "fault", answering(200, "\x00garbage", "application/octet-stream")), 502,
                 "does not parse", id="200-with-garbage"),
    # Held past the hold (503, naming the timeouts so far), or the exchange's own end (504).
    pytest.param(lambda sts: setattr(sts, "delay_seconds", 30.0), 503, "Timeout", id="hanging"),
]


@pytest.mark.parametrize(("break_sts", "status", "mention"), STS_FAULTS)
async def test_the_daemon_outlives_a_misbehaving_sts(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession,
    break_sts: Callable[[StsDouble], None], status: int, mention: str,
) -> None:
    # A short STS timeout, and for a hanging STS a short hold, so that it shows within the
    # test's bound; otherwise the caller waits for the exchange's own end (its retries).
    hold = "4" if status == 503 else "15"
    daemon = await start_daemon("--sts-timeout", "0.5", "--request-hold", hold)
    known = issuer.mint(SUBJECT_A)
    assert (await fetch(http, daemon, known)).status == 200

    break_sts(sts)
    newcomer = issuer.mint(SUBJECT_B)
    refused = await asyncio.wait_for(fetch(http, daemon, newcomer), BOUND_SECONDS)

    if status == 503 and refused.status == 504:  # on a slow machine the retries ended within the hold
        status, mention = 504, "did not answer within 0.5 s"
    assert refused.status == status, refused.body
    assert refused.content_type == "application/json"
    assert mention in refused.body["message"], refused.body["message"]
    assert "SECRETzFAULT" not in refused.body["message"]
    assert (await fetch(http, daemon, known)).status == 200  # the cached identity is still served
    assert alive(daemon)

    sts.heal()
    for _ in range(60):  # bounded: the retry of a pod, as the SDKs make it
        answer = await asyncio.wait_for(fetch(http, daemon, newcomer), BOUND_SECONDS)
        if answer.status == 200:
            break
        await asyncio.sleep(0.5)
    assert answer.status == 200, answer.body


async def test_sts_refusing_connections_is_a_clear_502(
    start_daemon: StartDaemon, issuer: Issuer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    daemon = await start_daemon("--sts-endpoint-url", closed, "--sts-timeout", "0.5", "--request-hold", "10")

    refused = await asyncio.wait_for(fetch(http, daemon, issuer.mint(SUBJECT_A)), BOUND_SECONDS)

    assert refused.status == 502 and refused.body["code"] == "sts_unavailable", refused.body
    assert f"cannot connect to STS at {closed}" in refused.body["message"]
    assert alive(daemon)


# --- remembered refusals: what a refused identity costs STS ---


async def test_an_identity_sts_denies_costs_one_call_per_window_however_often_it_asks(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession,
) -> None:
    clock = FakeClock(time.time())
    daemon = await start_daemon(clock=clock)
    sts.fail_with("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", status=403)
    tokens = [issuer.mint(SUBJECT_A, pod_name=f"p{n}") for n in range(49)]

    for _ in range(4):  # 196 requests, as in the report
        answers = await asyncio.gather(*(fetch(http, daemon, token) for token in tokens))
        assert {(a.status, a.body["code"]) for a in answers} == {(403, "sts_denied")}
        assert all("AccessDenied" in a.body["message"] for a in answers)
    assert len(sts.assume_calls) == 1

    clock.advance(config.REFUSAL_SECONDS + 1)  # the window ends: STS is asked once more
    await fetch(http, daemon, tokens[0])
    assert len(sts.assume_calls) == 2
    sts.heal()
    clock.advance(config.REFUSAL_SECONDS + 1)  # a trust-policy fix takes effect at the window's end
    assert (await fetch(http, daemon, tokens[0])).status == 200


async def test_invalid_identity_token_is_remembered_briefly_and_old_credentials_keep_serving(
    start_daemon: StartDaemon, issuer: Issuer, sts: StsDouble, http: aiohttp.ClientSession,
) -> None:
    clock = FakeClock(time.time())
    daemon = await start_daemon(clock=clock)
    token = issuer.mint(SUBJECT_A)
    first = await fetch(http, daemon, token)
    assert first.status == 200
    sts.fail_with("InvalidIdentityToken", "Couldn't retrieve verification key from your identity provider")
    clock.advance(3600 - 900)  # under the floor: a refresh is due, STS refuses it

    served = [await fetch(http, daemon, token) for _ in range(20)]

    assert {a.body["AccessKeyId"] for a in served} == {first.body["AccessKeyId"]}  # stale, still valid
    calls = len(sts.assume_calls)
    assert calls <= 1 + 2  # one exchange (at most two attempts for this code), not one per request
    fresh = issuer.mint(SUBJECT_B)
    refused = await fetch(http, daemon, fresh)
    assert refused.status == 403 and "InvalidIdentityToken" in refused.body["message"]
    again = await fetch(http, daemon, fresh)
    assert again.status == 403 and len(sts.assume_calls) == calls + 2  # remembered: no new call
    clock.advance(config.INVALID_TOKEN_REFUSAL_SECONDS + 1)  # briefly
    sts.heal()
    assert (await fetch(http, daemon, fresh)).status == 200


async def test_a_role_change_clears_a_remembered_refusal_at_once(
    start_k8s_daemon: StartK8sDaemon, k8s: K8sApiDouble, cluster: Cluster, sts: StsDouble,
    http: aiohttp.ClientSession,
) -> None:
    cluster.account("team-a", "app", ROLE_A)
    known = cluster.pod("team-a", "app-1", "app")
    daemon = await start_k8s_daemon(adjust=fast_api)
    sts.fault = lambda call: (sts_error("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity",
                                        status=403) if call.role_arn == ROLE_A else None)
    first = await fetch(http, daemon, cluster.token(known))
    assert (first.status, first.body["code"]) == (403, "sts_denied")
    # The refusal names the command that finds its broken link, and that command parses.
    command = first.body["message"].rpartition("To find the broken link: ")[2]
    assert command == f"irsa-cache doctor --live --pod-name team-a/app-1 --role-arn {ROLE_A}"
    build_parser().parse_args(shlex.split(command)[1:])
    assert (await fetch(http, daemon, cluster.token(known))).status == 403
    assert len(sts.assume_calls) == 1

    k8s.update(service_account("team-a", "app", ROLE_B))  # the fix: another role
    for _ in range(100):  # bounded: until the informer delivers the change
        answer = await fetch(http, daemon, cluster.token(known))
        if answer.status == 200:
            break
        await asyncio.sleep(0.05)
    assert answer.status == 200, answer.body
    assert sts.assume_calls[-1].role_arn == ROLE_B


# --- secrets never leave the process but in the 200 body ---

SECRET_KEY = "SECRETzKEYz" + "9" * 29
SESSION_TOKEN = "SESSIONzTOKENz" + "7" * 40
FULL = ('<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        "<AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAFAULTKEY00000001</AccessKeyId>"
        f"<SecretAccessKey>{SECRET_KEY}</SecretAccessKey><SessionToken>{SESSION_TOKEN}</SessionToken>"
        "<Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>"
        "<AssumedRoleUser><Arn>not-an-arn</Arn></AssumedRoleUser>"
        "</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>")
GARBAGE_WITH_SECRETS = [
    FULL[: len(FULL) * 2 // 3],  # truncated after the secrets
    FULL.replace("</Credentials>", ""),  # garbled
    FULL,  # well-formed but unusable (the ARN)
    FULL.replace("2099-01-01T00:00:00Z", f"{SECRET_KEY}"),  # a secret where a date belongs
    FULL + "<pad>" + "x" * 3_000_000 + "</pad>",  # oversized
    f"<html>{SECRET_KEY} {SESSION_TOKEN}</html>",  # a proxy echoing
]


async def test_nothing_sts_sends_reaches_a_log_line_an_error_body_or_a_metric(
    issuer: Issuer, sts: StsDouble, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    static = issuer.write_static_config(tmp_path, {"system:serviceaccount:batch:*": ROLE_A})
    listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "daemon.log"
    daemon = Background(
        [sys.executable, "-m", "daemon", "serve", "--listen", listen, "--metrics-listen", metrics_listen,
         "--static-config", str(static), "--region", "us-east-1", "--sts-endpoint-url", sts.url,
         "--log-level", "debug", "--request-hold", "10"],
        ready_url=f"http://{metrics_listen}/readyz", log_path=log_path,
    )
    bodies: list[str] = []
    await asyncio.to_thread(daemon.__enter__)
    try:
        for n, body in enumerate(GARBAGE_WITH_SECRETS):
            sts.fault = answering(200 if n < 5 else 500, body)
            token = issuer.mint(f"system:serviceaccount:batch:job-{n}")
            async with http.get(f"http://{listen}/v1/credentials", headers={"Authorization": token}) as response:
                bodies.append(await response.text())
                assert response.status >= 500
        async with http.get(f"http://{metrics_listen}/metrics") as response:
            bodies.append(await response.text())
    finally:
        await asyncio.to_thread(daemon.__exit__)

    written = log_path.read_text() + "\n".join(bodies)
    for secret in (SECRET_KEY, SESSION_TOKEN, SECRET_KEY[:20], SESSION_TOKEN[:20]):
        assert secret not in written
    assert "MalformedResponse" in written  # the failures themselves were reported

