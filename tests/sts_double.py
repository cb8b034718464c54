"""A recording, fault-injecting proxy in front of moto's STS.

moto answers AssumeRoleWithWebIdentity with real-shaped credentials but counts
nothing and never fails. This proxy forwards to it over real HTTP, records every
call (action, role, session name) and, when told, answers instead with STS's own
error shapes (AccessDenied, Throttling, 5xx) or delays, so tests can see what
the daemon asks of STS and how it behaves when STS misbehaves.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web


@dataclass(frozen=True)
class StsCall:
    action: str
    role_arn: str | None
    session_name: str | None
    duration_seconds: str | None
    web_identity_token: str | None = None


def sts_error(code: str, message: str, *, status: int = 400, kind: str = "Sender") -> web.Response:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    )
    return web.Response(status=status, text=body, content_type="text/xml")


Fault = Callable[[StsCall], "web.Response | None"]


class StsDouble:
    """Forwards to `upstream` (moto); `fault` may answer a call instead, `delay_seconds` slows every call."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.calls: list[StsCall] = []
        self.fault: Fault | None = None
        self.delay_seconds = 0.0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def assume_calls(self) -> list[StsCall]:
        return [call for call in self.calls if call.action == "AssumeRoleWithWebIdentity"]

    def fail_with(self, code: str, message: str, *, status: int = 400) -> None:
        self.fault = lambda call: sts_error(code, message, status=status)

    def heal(self) -> None:
        self.fault = None
        self.delay_seconds = 0.0

    async def start(self) -> StsDouble:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        call = StsCall(
            action=form.get("Action", ""),
            role_arn=form.get("RoleArn"),
            session_name=form.get("RoleSessionName"),
            duration_seconds=form.get("DurationSeconds"),
            web_identity_token=form.get("WebIdentityToken"),
        )
        self.calls.append(call)
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self.fault is not None:
            answer = self.fault(call)
            if answer is not None:
                return answer
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, f"{self.upstream}{request.path_qs}", data=body, headers=headers
        ) as upstream:
            return web.Response(
                status=upstream.status,
                body=await upstream.read(),
                content_type=upstream.content_type,
            )
