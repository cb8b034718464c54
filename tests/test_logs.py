"""What the daemon writes to its log: JSON lines, an audit line per issuance of
credentials to a pod token, and never a secret or a token."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp

from daemon.embedded import Background, Issuer, free_port
from tests.conftest import ROLE_A, ROLE_B, SUBJECT_A, SUBJECT_B, boto3_caller_identity, serve_args, token_file
from tests.sts_double import StsDouble


async def test_a_full_run_logs_no_secret_and_no_token(
    issuer: Issuer, sts: StsDouble, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    static_config = issuer.write_static_config(tmp_path, {SUBJECT_A: ROLE_A, SUBJECT_B: ROLE_B})
    listen, metrics_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    argv = serve_args(static_config, sts.url, "--log-level", "debug")
    argv[argv.index("--listen") + 1] = listen
    argv[argv.index("--metrics-listen") + 1] = metrics_listen
    log_path = tmp_path / "daemon.log"
    url = f"http://{listen}/v1/credentials"
    token = issuer.mint(SUBJECT_A, pod_name="app-7")
    tampered = token[:-8] + ("A" * 8 if not token.endswith("A" * 8) else "B" * 8)
    unmapped = issuer.mint("system:serviceaccount:other:app")
    denied_token = issuer.mint(SUBJECT_B, pod_name="b-1")

    daemon = Background([sys.executable, "-m", "daemon", "serve", *argv],
                        ready_url=f"http://{metrics_listen}/readyz", log_path=log_path)
    await asyncio.to_thread(daemon.__enter__)
    try:
        arn = await boto3_caller_identity(url, token_file(tmp_path, token), sts.url)
        async with http.get(url, headers={"Authorization": token}) as response:
            issued = await response.json()
        for bad in (tampered, unmapped):
            async with http.get(url, headers={"Authorization": bad}) as response:
                assert response.status in (401, 403)
        # An oversized header and a malformed one fail in aiohttp's parser, whose errors quote the request.
        for head in (f"Authorization: {token * 60}", f"Authorization: {token}\r\nBad Header {token}"):
            reader, writer = await asyncio.open_connection(*listen.split(":"))
            writer.write(f"GET /v1/credentials HTTP/1.1\r\nHost: {listen}\r\n{head}\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] in (b"400", b"431")
            writer.close()
        sts.fail_with("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
        async with http.get(url, headers={"Authorization": denied_token}) as response:
            assert response.status == 403
    finally:
        await asyncio.to_thread(daemon.__exit__)

    text = log_path.read_text()
    assert arn.endswith("assumed-role/app-a/team-a.app")
    for secret in (issued["SecretAccessKey"], issued["Token"], token, tampered, unmapped, denied_token):
        assert secret not in text
    # Not even a piece of a token: its signature, nor the head aiohttp's errors quote.
    assert token.rsplit(".", 1)[1] not in text
    assert token[:40] not in text

    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    audit = [line for line in lines if line["logger"] == "irsa_cache.audit"]
    # One issuance: the SDK's fetch; ours repeated it (same token, same credentials).
    assert len(audit) == 1
    assert audit[0]["pod"] == "app-7"
    assert audit[0]["namespace"] == "team-a"
    assert audit[0]["role_arn"] == ROLE_A
    assert audit[0]["access_key_id"] == issued["AccessKeyId"]
    assert audit[0]["outcome"] == "miss"
    assert len(audit[0]["token_fingerprint"]) == 12
    refusals = [line for line in lines if line["message"].startswith("request refused")]
    assert {line["code"] for line in refusals} >= {"bad_signature", "no_role", "sts_denied"}
