"""An STS double that throttles like STS: a rate limit shared by all callers, and latency.

    python bench/sts_throttling.py --port P --upstream http://127.0.0.1:MOTO [--rate 20] [--burst 20] [--latency 0.05]

Real STS admits a per-account, per-region request rate (around 600/s, shared by
everything in the account) and answers calls over it with

    HTTP 400  <ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>
              <Message>Rate exceeded</Message></Error><RequestId>...</RequestId></ErrorResponse>

This double does the same for AssumeRoleWithWebIdentity: one token bucket
(`--rate` per second, `--burst` at most) for every caller; a call that finds the
bucket empty gets that answer. Every answer, throttled or not, comes after
`--latency` seconds (the round trip to a regional endpoint). Calls inside the rate
are forwarded to moto (`daemon.embedded.MotoSts`), which answers with real-shaped
credentials; other actions are forwarded unmetered.

It runs in a process of its own, so that its CPU does not show on the clients' side.
Control endpoints, for the benchmark only:

    GET  /__bench__/health   200 once up
    GET  /__bench__/calls    every AssumeRoleWithWebIdentity seen since the last reset:
                             [{"t": epoch seconds, "role": RoleArn, "session": RoleSessionName,
                               "result": "ok"|"throttled"|"error"}]
    GET  /__bench__/stats    {"calls": N, "throttled": M} since the last reset
    POST /__bench__/reset    refill the bucket, forget the calls, reset moto

All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

THROTTLING_BODY = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
    "<Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"
    "<RequestId>{request_id}</RequestId></ErrorResponse>"
)
METERED_ACTIONS = frozenset({"AssumeRoleWithWebIdentity"})


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.reset()

    def reset(self) -> None:
        self._tokens = self.burst
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class ThrottlingSts:
    def __init__(self, *, upstream: str, rate: float, burst: float, latency: float) -> None:
        self.upstream = upstream.rstrip("/")
        self.bucket = TokenBucket(rate, burst)
        self.latency = latency
        self.calls: list[dict[str, object]] = []
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/__bench__/health", self._health)
        app.router.add_get("/__bench__/calls", self._calls)
        app.router.add_get("/__bench__/stats", self._stats)
        app.router.add_post("/__bench__/reset", self._reset)
        app.router.add_route("*", "/{tail:.*}", self._sts)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        # Enough connections for every admitted call: moto answers in a few ms.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=30)
        )

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.calls)

    async def _stats(self, request: web.Request) -> web.Response:
        throttled = sum(1 for call in self.calls if call["result"] == "throttled")
        return web.json_response({"calls": len(self.calls), "throttled": throttled})

    async def _reset(self, request: web.Request) -> web.Response:
        assert self._session is not None
        async with self._session.post(f"{self.upstream}/moto-api/reset") as answer:
            await answer.read()
        self.calls = []
        self.bucket.reset()
        return web.json_response({"reset": True})

    async def _sts(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        body = await request.read()
        form = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
        action = form.get("Action", "")
        metered = action in METERED_ACTIONS
        admitted = self.bucket.take() if metered else True
        record: dict[str, object] = {"t": arrived, "role": form.get("RoleArn"),
                                     "session": form.get("RoleSessionName"), "result": "ok"}
        if metered:
            self.calls.append(record)
        if self.latency:
            await asyncio.sleep(self.latency)
        if not admitted:
            record["result"] = "throttled"
            return web.Response(
                status=400, text=THROTTLING_BODY.format(request_id=uuid.uuid4()), content_type="text/xml"
            )
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        try:
            async with self._session.request(
                request.method, f"{self.upstream}{request.path_qs}", data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                if upstream.status != 200:
                    record["result"] = "error"
                return web.Response(status=upstream.status, body=payload, content_type=upstream.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            record["result"] = "error"
            return web.Response(status=503, text=f"upstream failed: {type(exc).__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="moto server URL")
    parser.add_argument("--rate", type=float, default=20.0, help="AssumeRoleWithWebIdentity calls/s admitted (default 20)")
    parser.add_argument("--burst", type=float, default=20.0, help="token bucket size (default 20)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before every answer (default 0.05)")
    args = parser.parse_args()
    sts = ThrottlingSts(upstream=args.upstream, rate=args.rate, burst=args.burst, latency=args.latency)
    web.run_app(sts.app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
