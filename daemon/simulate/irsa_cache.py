"""irsa-cache: one `SimulatedDaemon` per node, between the node's pods and STS.

Routes each pod's request to its node's daemon with the pod's own token, tells the
daemon which identities still have a live pod on the node (what the Kubernetes
directory's pod informer tells the real one), and plays the DaemonSet's life: a
rollout stops and restarts daemons, a node replacement brings up fresh ones.
"""

from __future__ import annotations

import random
from collections import Counter

from daemon.simulate import adapter
from daemon.simulate.inputs import DaemonKnobs
from daemon.simulate.pods import NO_ANSWER, Pod, Reply, Request
from daemon.simulate.vloop import VirtualTimeLoop


class IrsaCacheEndpoint:
    def __init__(self, *, loop: VirtualTimeLoop, knobs: DaemonKnobs, sts: adapter.ModelledSts,
                 identities: int, nodes: int, seed: int) -> None:
        self._loop = loop
        self._seed = seed
        self._knobs = knobs
        self._sts = sts
        self._keys = [adapter.identity_key(identity) for identity in range(identities)]
        self._identity_of = {key: identity for identity, key in enumerate(self._keys)}
        self._tokens = adapter.Tokens()
        self._live: Counter[tuple[int, int]] = Counter()  # (node, identity) -> live pods
        self.daemons: dict[int, adapter.SimulatedDaemon] = {}
        self.node_count = nodes  # what the DaemonSet's status says
        self._count_pending = False

    def daemon(self, node: int) -> adapter.SimulatedDaemon:
        daemon = self.daemons.get(node)
        if daemon is None:
            def in_use(key: object, node: int = node) -> bool:
                return self._live[(node, self._identity_of[key])] > 0  # type: ignore[index]

            daemon = self.daemons[node] = adapter.SimulatedDaemon(
                loop=self._loop, knobs=self._knobs, sts=self._sts, in_use=in_use, nodes=lambda: self.node_count,
                rng=random.Random(f"{self._seed}:{node}"))
        return daemon

    def request(self, pod: Pod, reply: Reply) -> Request | None:
        daemon = self.daemon(pod.node)
        if not daemon.up:
            reply(NO_ANSWER, None)
            return None
        key = self._keys[pod.identity]
        token = self._tokens.of(pod.number, key, pod.started_at, self._loop.time())
        return daemon.request(key, token, reply)

    def pod_started(self, pod: Pod) -> None:
        self._live[(pod.node, pod.identity)] += 1
        self.daemon(pod.node)

    def pod_stopped(self, pod: Pod) -> None:
        self._live[(pod.node, pod.identity)] -= 1
        self._tokens.forget(pod.number)

    def stop_node(self, node: int) -> None:
        self.daemon(node).stop()

    def node_added(self, node: int) -> None:
        self._count(+1)

    def node_removed(self, node: int) -> None:
        self.daemon(node).stop()
        self.daemons.pop(node, None)
        self._count(-1)

    def _count(self, change: int) -> None:
        """Nodes join and leave in waves: tell the daemons once per wave, not once per node."""
        self.node_count += change
        if not self._count_pending:
            self._count_pending = True
            self._loop.call_soon(self._publish_count)

    def _publish_count(self) -> None:
        self._count_pending = False
        for daemon in self.daemons.values():
            daemon.nodes_changed()

    def start_node(self, node: int, *, handoff: bool) -> None:
        self.daemon(node).start(handoff=handoff)
