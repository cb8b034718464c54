"""The Kubernetes API double, proven against the real kubernetes-asyncio client.

Nothing in the client is mocked: every answer goes over HTTP on 127.0.0.1 and is
parsed by kubernetes-asyncio's own models and its `watch.Watch`. Every stream and
wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from daemon.embedded import Issuer
from tests.k8s_double import (
    POD_NAME_KEY,
    POD_UID_KEY,
    ROLE_ARN_ANNOTATION,
    K8sApiDouble,
    TokenReviewCall,
    daemon_set,
    identity_for,
    pod,
    service_account,
)

ROLE_A = "arn:aws:iam::123456789012:role/app-a"
ROLE_B = "arn:aws:iam::123456789012:role/app-b"
SA_PATH = "/api/v1/serviceaccounts"
PODS_PATH = "/api/v1/pods"
NODE_A = "spec.nodeName=node-a"
BOUND = 5.0  # seconds: the most any single wait in these tests may take

Event = dict[str, Any]


@pytest.fixture
async def api(k8s: K8sApiDouble) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(k8s.client_configuration()) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


async def collect(
    func: Callable[..., Any], count: int, events: list[Event] | None = None, **kwargs: Any
) -> tuple[list[Event], watch.Watch]:
    """Read up to `count` events from a real `Watch().stream(func, **kwargs)`, within BOUND seconds.

    Events land in `events` as they arrive, so a caller still sees them if the stream fails.
    """
    seen = [] if events is None else events
    stream = watch.Watch()
    async with stream, asyncio.timeout(BOUND):
        async for event in stream.stream(func, **kwargs):
            seen.append(event)
            if len(seen) == count:
                break
    return seen, stream


async def watching(k8s: K8sApiDouble, coro: Any, *, watches: int = 1) -> asyncio.Task[Any]:
    """Run `coro` (a collect) in a task and return once the double holds `watches` open streams."""
    task = asyncio.create_task(coro)
    try:
        await k8s.wait_for_watches(watches, timeout=BOUND)
    except BaseException:
        task.cancel()
        raise
    return task


def types(events: list[Event]) -> list[str]:
    return [event["type"] for event in events]


# -- ServiceAccounts: list and watch ------------------------------------------------------


async def test_list_service_accounts_for_all_namespaces_is_parsed_into_models(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    created = k8s.create(service_account("team-a", "app", role_arn=ROLE_A))
    k8s.create(service_account("team-b", "app"))

    listed = await core.list_service_account_for_all_namespaces()
    namespaced = await core.list_namespaced_service_account("team-b")

    assert isinstance(listed, client.V1ServiceAccountList)
    assert listed.kind == "ServiceAccountList" and listed.api_version == "v1"
    assert listed.metadata.resource_version == str(k8s.resource_version)
    first = listed.items[0]
    assert isinstance(first, client.V1ServiceAccount)
    assert (first.metadata.namespace, first.metadata.name) == ("team-a", "app")
    assert first.metadata.annotations[ROLE_ARN_ANNOTATION] == ROLE_A
    assert first.metadata.uid == created["metadata"]["uid"]
    assert first.metadata.resource_version == created["metadata"]["resourceVersion"]
    assert first.metadata.creation_timestamp is not None
    assert [item.metadata.namespace for item in namespaced.items] == ["team-b"]
    assert k8s.requests[("list", SA_PATH)] == 1
    assert k8s.count("list", "/api/v1/namespaces/team-b/serviceaccounts") == 1


async def test_watch_streams_added_modified_deleted_and_a_bookmark(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    start = (await core.list_service_account_for_all_namespaces()).metadata.resource_version
    task = await watching(k8s, collect(
        core.list_service_account_for_all_namespaces, 4,
        resource_version=start, allow_watch_bookmarks=True, timeout_seconds=30,
    ))

    created = k8s.create(service_account("team-a", "app", role_arn=ROLE_A))
    k8s.update(service_account("team-a", "app", role_arn=ROLE_B))
    k8s.delete("ServiceAccount", "team-a", "app")
    k8s.send_bookmarks()
    events, stream = await task

    assert types(events) == ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    added, modified, deleted, bookmark = events
    assert all(isinstance(event["object"], client.V1ServiceAccount) for event in (added, modified, deleted))
    assert added["object"].metadata.annotations[ROLE_ARN_ANNOTATION] == ROLE_A
    assert modified["object"].metadata.annotations[ROLE_ARN_ANNOTATION] == ROLE_B
    assert {e["object"].metadata.uid for e in (added, modified, deleted)} == {created["metadata"]["uid"]}
    versions = [int(e["object"].metadata.resource_version) for e in (added, modified, deleted)]
    assert versions == sorted(versions) and versions[-1] == k8s.resource_version
    assert bookmark["raw_object"] == {
        "kind": "ServiceAccount", "apiVersion": "v1", "metadata": {"resourceVersion": str(k8s.resource_version)},
    }
    assert stream.resource_version == str(k8s.resource_version)
    [asked] = k8s.watch_calls(SA_PATH)
    assert (asked.resource_version, asked.allow_watch_bookmarks, asked.timeout_seconds) == (start, True, 30)


async def test_watch_from_a_resource_version_sends_only_later_changes(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    k8s.create(service_account("team-a", "one"))
    k8s.create(service_account("team-a", "two"))
    middle = k8s.resource_version
    k8s.create(service_account("team-a", "three"))
    k8s.update(service_account("team-a", "two", role_arn=ROLE_A))

    resumed, _ = await collect(core.list_service_account_for_all_namespaces, 2,
                               resource_version=str(middle), timeout_seconds=30)
    fresh, _ = await collect(core.list_service_account_for_all_namespaces, 3, timeout_seconds=30)

    assert [(e["type"], e["object"].metadata.name) for e in resumed] == [("ADDED", "three"), ("MODIFIED", "two")]
    # No resourceVersion: "Get State and Start at Most Recent", synthetic ADDED for what exists.
    assert [(e["type"], e["object"].metadata.name) for e in fresh] == [
        ("ADDED", "one"), ("ADDED", "three"), ("ADDED", "two"),
    ]
    assert [w.resource_version for w in k8s.watch_calls(SA_PATH)] == [str(middle), None]


async def test_send_initial_events_ends_the_replay_with_a_marked_bookmark(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    k8s.create(service_account("team-a", "one"))
    at = str(k8s.resource_version)

    events, _ = await collect(core.list_service_account_for_all_namespaces, 2, resource_version=at,
                              resource_version_match="NotOlderThan", send_initial_events=True,
                              allow_watch_bookmarks=True, timeout_seconds=30)

    assert types(events) == ["ADDED", "BOOKMARK"]
    assert events[1]["raw_object"]["metadata"] == {
        "resourceVersion": at, "annotations": {"k8s.io/initial-events-end": "true"},
    }


async def test_watch_ends_when_timeout_seconds_elapse_with_a_last_bookmark(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()

    events, _ = await collect(core.list_service_account_for_all_namespaces, 100,
                              resource_version=str(k8s.resource_version),
                              allow_watch_bookmarks=True, timeout_seconds=1)

    assert 0.9 <= loop.time() - began < 4
    assert types(events) == ["BOOKMARK"]
    assert k8s.open_watches == 0


async def test_bookmarks_only_for_watches_that_allow_them_and_periodically(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    k8s.bookmark_interval = 0.2

    with_bookmarks, _ = await collect(core.list_service_account_for_all_namespaces, 2,
                                      resource_version=str(k8s.resource_version),
                                      allow_watch_bookmarks=True, timeout_seconds=30)
    without, _ = await collect(core.list_service_account_for_all_namespaces, 100,
                               resource_version=str(k8s.resource_version), timeout_seconds=1)

    assert types(with_bookmarks) == ["BOOKMARK", "BOOKMARK"]
    assert without == []


# -- Pods: the node's field selector -------------------------------------------------------


async def test_field_selector_filters_the_pod_list(k8s: K8sApiDouble, core: client.CoreV1Api) -> None:
    mine = k8s.create(pod("team-a", "app-1", "node-a", "app"))
    k8s.create(pod("team-a", "app-2", "node-b", "app"))
    k8s.create(pod("team-b", "pending", None, "app", phase="Pending"))

    listed = await core.list_pod_for_all_namespaces(field_selector=NODE_A)
    unscheduled = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=")

    assert isinstance(listed, client.V1PodList) and listed.kind == "PodList"
    [item] = listed.items
    assert isinstance(item, client.V1Pod)
    assert (item.metadata.name, item.metadata.uid) == ("app-1", mine["metadata"]["uid"])
    assert (item.spec.node_name, item.spec.service_account_name, item.status.phase) == ("node-a", "app", "Running")
    assert [p.metadata.name for p in unscheduled.items] == ["pending"]
    assert k8s.calls[-1].query["fieldSelector"] == "spec.nodeName="


async def test_field_selector_on_a_watch_follows_the_real_servers_before_and_after_rule(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    k8s.create(pod("team-a", "app-1", "node-a", "app"))
    k8s.create(pod("team-a", "pending", None, "app", phase="Pending"))
    start = (await core.list_pod_for_all_namespaces(field_selector=NODE_A)).metadata.resource_version
    task = await watching(k8s, collect(core.list_pod_for_all_namespaces, 4, field_selector=NODE_A,
                                       resource_version=start, timeout_seconds=30))

    k8s.create(pod("team-a", "elsewhere", "node-b", "app"))            # never matches: not sent
    k8s.update(pod("team-a", "pending", "node-a", "app"))              # bound here: starts matching
    k8s.update(pod("team-a", "app-1", "node-a", "app", phase="Succeeded"))
    k8s.update(pod("team-a", "app-1", "node-b", "app", phase="Succeeded"))  # stops matching
    moved_at = k8s.resource_version
    k8s.delete("Pod", "team-a", "pending")
    events, _ = await task

    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "pending"), ("MODIFIED", "app-1"), ("DELETED", "app-1"), ("DELETED", "pending"),
    ]
    moved = events[2]["object"]
    # The object as it was when it last matched, at the resourceVersion of the change.
    assert (moved.spec.node_name, moved.metadata.resource_version) == ("node-a", str(moved_at))
    assert events[3]["object"].metadata.resource_version == str(k8s.resource_version)
    assert k8s.watch_calls(PODS_PATH)[0].field_selector == NODE_A


async def test_unsupported_field_selector_is_a_bad_request(core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as raised:
        await core.list_pod_for_all_namespaces(field_selector="spec.containers=app")

    assert raised.value.status == 400
    status = json.loads(raised.value.body)
    assert (status["kind"], status["reason"]) == ("Status", "BadRequest")
    assert status["message"] == "field label not supported: spec.containers"


async def test_read_namespaced_pod_and_not_found(k8s: K8sApiDouble, core: client.CoreV1Api) -> None:
    created = k8s.create(pod("team-a", "app-1", "node-a", "app", uid="0f0e0d0c-0000-4000-8000-000000000001"))

    found = await core.read_namespaced_pod("app-1", "team-a")
    with pytest.raises(ApiException) as raised:
        await core.read_namespaced_pod("ghost", "team-a")

    assert isinstance(found, client.V1Pod)
    assert found.metadata.uid == created["metadata"]["uid"] == "0f0e0d0c-0000-4000-8000-000000000001"
    assert raised.value.status == 404
    status = json.loads(raised.value.body)
    assert (status["reason"], status["message"]) == ("NotFound", 'pods "ghost" not found')
    assert status["details"] == {"name": "ghost", "kind": "pods"}
    assert k8s.count("get", "/api/v1/namespaces/team-a/pods/app-1") == 1


# -- DaemonSets (apps/v1) --------------------------------------------------------------------


async def test_a_daemonset_is_read_through_the_apps_api_and_its_status_can_change(
    k8s: K8sApiDouble, api: client.ApiClient
) -> None:
    apps = client.AppsV1Api(api)
    k8s.create(daemon_set("kube-system", "irsa-cache", desired=3))

    first = await apps.read_namespaced_daemon_set("irsa-cache", "kube-system")
    k8s.set_desired_nodes("kube-system", "irsa-cache", 7)
    second = await apps.read_namespaced_daemon_set("irsa-cache", "kube-system")
    with pytest.raises(ApiException) as missing:
        await apps.read_namespaced_daemon_set("other", "kube-system")

    assert isinstance(first, client.V1DaemonSet)
    assert (first.status.desired_number_scheduled, second.status.desired_number_scheduled) == (3, 7)
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert missing.value.status == 404
    assert k8s.count("get", "/apis/apps/v1/namespaces/kube-system/daemonsets/irsa-cache") == 2


async def test_daemonsets_are_listed_and_watched_by_name_and_only_under_apps(
    k8s: K8sApiDouble, api: client.ApiClient, core: client.CoreV1Api
) -> None:
    apps = client.AppsV1Api(api)
    k8s.create(daemon_set("kube-system", "irsa-cache", desired=3))
    k8s.create(daemon_set("kube-system", "other", desired=3))

    listed = await apps.list_namespaced_daemon_set("kube-system", field_selector="metadata.name=irsa-cache")
    k8s.set_desired_nodes("kube-system", "other", 9)
    k8s.set_desired_nodes("kube-system", "irsa-cache", 5)
    (event,), _ = await collect(apps.list_namespaced_daemon_set, 1, namespace="kube-system",
                                field_selector="metadata.name=irsa-cache",
                                resource_version=listed.metadata.resource_version, timeout_seconds=30)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{k8s.url}/api/v1/namespaces/kube-system/daemonsets/irsa-cache",
                            headers={"Authorization": f"Bearer {k8s.token}"}) as unrouted:
            unrouted_status = unrouted.status

    assert [item.metadata.name for item in listed.items] == ["irsa-cache"]
    assert listed.api_version == "apps/v1"
    assert event["type"] == "MODIFIED" and event["object"].status.desired_number_scheduled == 5
    assert unrouted_status == 404  # DaemonSets are not in the core group


# -- 410 Expired -----------------------------------------------------------------------------


@pytest.mark.parametrize("expired_as", ["event", "status"])
async def test_watch_from_a_compacted_resource_version_raises_410(
    k8s: K8sApiDouble, core: client.CoreV1Api, expired_as: str
) -> None:
    k8s.expired_as = expired_as  # type: ignore[assignment]
    k8s.create(service_account("team-a", "one"))
    stale = str(k8s.resource_version)
    k8s.create(service_account("team-a", "two"))
    k8s.compact()

    with pytest.raises(ApiException) as raised:
        await collect(core.list_service_account_for_all_namespaces, 1,
                      resource_version=stale, timeout_seconds=30)

    assert raised.value.status == 410
    assert raised.value.reason == f"Expired: too old resource version: {stale} ({k8s.resource_version})"
    assert [w.resource_version for w in k8s.watch_calls()] == [stale]
    # The way out is the documented one: list again, watch from the new resourceVersion.
    fresh = (await core.list_service_account_for_all_namespaces()).metadata.resource_version
    task = await watching(k8s, collect(core.list_service_account_for_all_namespaces, 1,
                                       resource_version=fresh, timeout_seconds=30))
    k8s.create(service_account("team-a", "three"))
    events, _ = await task
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "three")]


async def test_unbounded_watch_retries_a_410_once_with_the_same_resource_version(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    stale = str(k8s.resource_version)
    k8s.create(service_account("team-a", "one"))
    k8s.compact()

    with pytest.raises(ApiException) as raised:
        await collect(core.list_service_account_for_all_namespaces, 1, resource_version=stale)

    assert raised.value.status == 410
    assert [w.resource_version for w in k8s.watch_calls(SA_PATH)] == [stale, stale]


async def test_history_window_expires_the_oldest_resource_versions(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    k8s.history_size = 2
    oldest = str(k8s.resource_version)
    for name in ("one", "two", "three"):
        k8s.create(service_account("team-a", name))
    inside = str(k8s.resource_version - 2)

    with pytest.raises(ApiException) as raised:
        await collect(core.list_service_account_for_all_namespaces, 1,
                      resource_version=oldest, timeout_seconds=30)
    events, _ = await collect(core.list_service_account_for_all_namespaces, 2,
                              resource_version=inside, timeout_seconds=30)

    assert raised.value.status == 410
    assert [e["object"].metadata.name for e in events] == ["two", "three"]


# -- dropped streams and outages ------------------------------------------------------------


async def test_drop_watches_cuts_the_stream_mid_body(k8s: K8sApiDouble, core: client.CoreV1Api) -> None:
    seen: list[Event] = []
    task = await watching(k8s, collect(core.list_service_account_for_all_namespaces, 10, seen,
                                       resource_version=str(k8s.resource_version), timeout_seconds=30))
    k8s.create(service_account("team-a", "one"))
    async with asyncio.timeout(BOUND):
        while not seen:
            await asyncio.sleep(0.01)

    assert k8s.drop_watches() == 1
    with pytest.raises(aiohttp.ClientPayloadError):
        await task

    assert types(seen) == ["ADDED"]
    assert k8s.count("watch", SA_PATH) == 1  # the Watch did not reconnect by itself


async def test_clean_end_of_stream_stops_a_bounded_watch(k8s: K8sApiDouble, core: client.CoreV1Api) -> None:
    task = await watching(k8s, collect(core.list_service_account_for_all_namespaces, 10,
                                       resource_version=str(k8s.resource_version), timeout_seconds=30))

    k8s.drop_watches(abrupt=False)
    events, _ = await task

    assert events == []
    assert k8s.count("watch", SA_PATH) == 1


async def test_clean_end_of_stream_resumes_an_unbounded_watch_from_its_last_resource_version(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    seen: list[Event] = []
    task = await watching(k8s, collect(core.list_service_account_for_all_namespaces, 2, seen,
                                       resource_version=str(k8s.resource_version)))
    k8s.create(service_account("team-a", "one"))
    async with asyncio.timeout(BOUND):
        while not seen:
            await asyncio.sleep(0.01)
    last = seen[0]["object"].metadata.resource_version

    k8s.drop_watches(abrupt=False)
    async with asyncio.timeout(BOUND):
        while k8s.count("watch", SA_PATH) < 2:
            await asyncio.sleep(0.01)
    await k8s.wait_for_watches(1)
    k8s.create(service_account("team-a", "two"))
    events, _ = await task

    assert [e["object"].metadata.name for e in events] == ["one", "two"]
    assert [w.resource_version for w in k8s.watch_calls(SA_PATH)][1] == last


async def test_go_down_refuses_connections_and_come_up_serves_on_the_same_port(
    k8s: K8sApiDouble, core: client.CoreV1Api
) -> None:
    k8s.create(service_account("team-a", "app"))
    url = k8s.url
    task = await watching(k8s, collect(core.list_service_account_for_all_namespaces, 10,
                                       resource_version=str(k8s.resource_version), timeout_seconds=30))

    await k8s.go_down()
    with pytest.raises(aiohttp.ClientPayloadError):
        await task
    with pytest.raises(aiohttp.ClientConnectorError):
        await core.list_service_account_for_all_namespaces()
    await k8s.come_up()
    listed = await core.list_service_account_for_all_namespaces()

    assert k8s.url == url
    assert [item.metadata.name for item in listed.items] == ["app"]
    assert k8s.count("list", SA_PATH) == 1  # the refused one never reached the server


async def test_unavailable_answers_503_to_lists_and_watches(k8s: K8sApiDouble, core: client.CoreV1Api) -> None:
    await k8s.go_down(refuse=False)

    with pytest.raises(ApiException) as listing:
        await core.list_service_account_for_all_namespaces()
    with pytest.raises(ApiException) as watching_:
        await collect(core.list_service_account_for_all_namespaces, 1, timeout_seconds=30)
    await k8s.come_up()
    await core.list_service_account_for_all_namespaces()

    assert listing.value.status == 503
    assert json.loads(listing.value.body)["reason"] == "ServiceUnavailable"
    assert watching_.value.status == 503
    assert [(c.verb, c.status) for c in k8s.calls] == [("list", 503), ("watch", 503), ("list", 200)]


async def test_a_wrong_bearer_token_is_unauthorized(k8s: K8sApiDouble) -> None:
    async with client.ApiClient(k8s.client_configuration(token="not-the-token")) as other:
        with pytest.raises(ApiException) as raised:
            await client.CoreV1Api(other).list_pod_for_all_namespaces()

    assert raised.value.status == 401
    assert json.loads(raised.value.body)["reason"] == "Unauthorized"


async def test_the_real_kubeconfig_loader_reaches_the_double(k8s: K8sApiDouble, tmp_path: Path) -> None:
    k8s.create(pod("team-a", "app-1", "node-a", "app"))
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(k8s.write_kubeconfig(tmp_path / "kubeconfig")),
                                  client_configuration=configuration)

    async with client.ApiClient(configuration) as loaded:
        listed = await client.CoreV1Api(loaded).list_pod_for_all_namespaces(field_selector=NODE_A)

    assert [item.metadata.name for item in listed.items] == ["app-1"]


# -- TokenReview ----------------------------------------------------------------------------


async def test_token_review_answers_the_bound_identity(k8s: K8sApiDouble, api: client.ApiClient) -> None:
    account = k8s.create(service_account("team-a", "app", role_arn=ROLE_A))
    bound = k8s.create(pod("team-a", "app-1", "node-a", "app"))
    k8s.token_reviews["good"] = identity_for(account, bound)  # type: ignore[index]
    authentication = client.AuthenticationV1Api(api)

    async def review(token: str, audiences: list[str]) -> client.V1TokenReview:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        return await authentication.create_token_review(body)

    good = await review("good", ["sts.amazonaws.com"])
    wrong_audience = await review("good", ["vault"])
    unknown = await review("forged", ["sts.amazonaws.com"])
    k8s.delete(bound)
    pod_gone = await review("good", ["sts.amazonaws.com"])

    assert isinstance(good, client.V1TokenReview)
    assert good.status.authenticated is True
    user = good.status.user
    assert (user.username, user.uid) == ("system:serviceaccount:team-a:app", account["metadata"]["uid"])
    assert "system:serviceaccounts:team-a" in user.groups
    assert user.extra == {POD_NAME_KEY: ["app-1"], POD_UID_KEY: [bound["metadata"]["uid"]],
                          "authentication.kubernetes.io/node-name": ["node-a"]}
    assert good.status.audiences == ["sts.amazonaws.com"]
    assert not wrong_audience.status.authenticated and "audiences" in wrong_audience.status.error
    assert not unknown.status.authenticated and unknown.status.error == "invalid bearer token"
    assert not pod_gone.status.authenticated and "invalidated" in pod_gone.status.error
    assert k8s.token_review_requests[0] == TokenReviewCall("good", ("sts.amazonaws.com",))
    assert k8s.count("create", "/apis/authentication.k8s.io/v1/tokenreviews") == 4


async def test_token_review_status_can_come_from_a_callable(k8s: K8sApiDouble, api: client.ApiClient) -> None:
    k8s.token_reviews = lambda token, audiences: {"authenticated": False, "error": f"no {token} for {audiences}"}

    answer = await client.AuthenticationV1Api(api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token="t", audiences=["a"])))

    assert not answer.status.authenticated
    assert answer.status.error == "no t for ['a']"


# -- issuer discovery ------------------------------------------------------------------------


async def test_discovery_endpoints_parse_only_without_preloaded_content(
    k8s: K8sApiDouble, api: client.ApiClient, issuer: Issuer
) -> None:
    well_known = client.WellKnownApi(api)
    openid = client.OpenidApi(api)

    preloaded = await well_known.get_service_account_issuer_open_id_configuration()
    discovery_response = await well_known.get_service_account_issuer_open_id_configuration(_preload_content=False)
    discovery = json.loads(await discovery_response.read())
    keys_response = await openid.get_service_account_issuer_open_id_keyset(_preload_content=False)
    keys = json.loads(await keys_response.read())
    rotated = Issuer()
    k8s.rotate_keys(rotated.jwks())
    rotated_response = await openid.get_service_account_issuer_open_id_keyset(_preload_content=False)
    after = json.loads(await rotated_response.read())

    # Preloaded, the client hands back str() of a dict, which is not JSON.
    assert isinstance(preloaded, str) and preloaded.startswith("{'issuer'")
    with pytest.raises(ValueError):
        json.loads(preloaded)
    assert discovery == {
        "issuer": issuer.url,
        "jwks_uri": f"{k8s.url}/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    assert keys_response.headers["Content-Type"] == "application/jwk-set+json"
    assert keys_response.headers["Cache-Control"] == "public, max-age=3600"
    assert keys == issuer.jwks()
    assert [key["kid"] for key in after["keys"]] == [rotated.kid]
