"""The static directory: its YAML file, validated field by field, and subject-to-role rules."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from daemon.directory.base import DEFAULT_AUDIENCE
from daemon.directory.static import Rule, StaticDirectory, load_static_config
from daemon.embedded import DEMO_ACCOUNT
from daemon.errors import ConfigError, IdentityNotAllowedError
from daemon.models import Identity
from daemon.tokens import FileKeySource, UrlKeySource

ISSUER = "https://oidc.example.test/id/EXAMPLE"
ROLE_APP = f"arn:aws:iam::{DEMO_ACCOUNT}:role/app"
ROLE_BATCH = f"arn:aws:iam::{DEMO_ACCOUNT}:role/batch"
ROLE_OTHER = f"arn:aws:iam::{DEMO_ACCOUNT}:role/other"
JWKS = {"keys": []}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "conf"
    (folder / "keys").mkdir(parents=True)
    (folder / "keys" / "jwks.json").write_text(json.dumps(JWKS))
    return folder


def identity(subject: str) -> Identity:
    return Identity(issuer=ISSUER, subject=subject, audience=DEFAULT_AUDIENCE)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_static_config(path)
    return caught.value.problems


# --- loading ---


def test_a_valid_file(conf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(conf_dir / "static.yaml", f"""
        issuer: {ISSUER}
        jwks_file: keys/jwks.json
        identities:
          - subject: system:serviceaccount:my-app:default
            role_arn: {ROLE_APP}
          - subject: "system:serviceaccount:batch:*"
            role_arn: {ROLE_BATCH}
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the config's folder, not the working directory

    trust, directory = load_static_config(path)

    assert trust.issuer == ISSUER
    assert trust.audience == DEFAULT_AUDIENCE == "sts.amazonaws.com"
    assert isinstance(trust.key_source, FileKeySource)
    assert trust.key_source.path == (conf_dir / "keys" / "jwks.json").resolve()
    assert directory.ready is True


async def test_the_file_key_source_reads_the_resolved_file(conf_dir: Path) -> None:
    path = write(conf_dir / "static.yaml", f"""
        issuer: {ISSUER}
        jwks_file: keys/jwks.json
        identities: [{{subject: a, role_arn: "{ROLE_APP}"}}]
    """)

    trust, _ = load_static_config(path)

    assert await trust.key_source.fetch() == JWKS


def test_an_absolute_jwks_file_and_a_custom_audience(conf_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "other" / "jwks.json"
    keys.parent.mkdir()
    keys.write_text(json.dumps(JWKS))
    path = write(conf_dir / "static.yaml", f"""
        issuer: {ISSUER}
        audience: my-audience
        jwks_file: {keys}
        identities: [{{subject: a, role_arn: "{ROLE_APP}"}}]
    """)

    trust, _ = load_static_config(path)

    assert trust.audience == "my-audience"
    assert trust.key_source.path == keys.resolve()


def test_jwks_url_gives_a_url_key_source(conf_dir: Path) -> None:
    path = write(conf_dir / "static.yaml", f"""
        issuer: {ISSUER}
        jwks_url: https://oidc.example.test/id/EXAMPLE/keys
        identities:
          - subject: a
            role_arn: {ROLE_APP}
    """)

    trust, _ = load_static_config(path)

    assert isinstance(trust.key_source, UrlKeySource)
    assert trust.key_source.url == "https://oidc.example.test/id/EXAMPLE/keys"


_IDENTITIES = f"""
identities:
  - subject: system:serviceaccount:a:a
    role_arn: {ROLE_APP}
"""
_KEYS = "jwks_file: keys/jwks.json\n"

BAD_FILES = [
    # content, the field the one problem line must name, something it must mention
    pytest.param(_KEYS + _IDENTITIES, "issuer", "required", id="missing-issuer"),
    pytest.param(f"issuer: ''\n{_KEYS}{_IDENTITIES}", "issuer", "required", id="empty-issuer"),
    pytest.param(f"issuer: [a, b]\n{_KEYS}{_IDENTITIES}", "issuer", "required", id="issuer-not-a-string"),
    pytest.param(f"issuer: {ISSUER}\naudience: ''\n{_KEYS}{_IDENTITIES}", "audience", "non-empty", id="empty-audience"),
    pytest.param(f"issuer: {ISSUER}\njwks_url: https://keys.test\n{_KEYS}{_IDENTITIES}", "jwks_file/jwks_url",
                 "exactly one", id="both-jwks"),
    pytest.param(f"issuer: {ISSUER}\n{_IDENTITIES}", "jwks_file/jwks_url", "exactly one", id="neither-jwks"),
    pytest.param(f"issuer: {ISSUER}\njwks_file: keys/missing.json\n{_IDENTITIES}", "jwks_file", "missing.json",
                 id="missing-jwks-file"),
    pytest.param(f"issuer: {ISSUER}\njwks_file: keys\n{_IDENTITIES}", "jwks_file", "keys", id="jwks-file-is-a-folder"),
    pytest.param(f"issuer: {ISSUER}\njwks_url: file:///etc/keys.json\n{_IDENTITIES}", "jwks_url", "file:///etc/keys.json",
                 id="jwks-url-not-http"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}identities: []\n", "identities", "required", id="identities-empty"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}", "identities", "required", id="identities-missing"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}identities: {{a: b}}\n", "identities", "list", id="identities-a-mapping"),
    pytest.param(
        f"issuer: {ISSUER}\n{_KEYS}{_IDENTITIES}  - subject: b\n    role_arn: arn:aws:iam::12345:role/short-account\n",
        "identities[1].role_arn", "12345", id="bad-role-arn-second",
    ),
    pytest.param(
        f"issuer: {ISSUER}\n{_KEYS}{_IDENTITIES}  - subject: b\n    role_arn: arn:aws:iam::{DEMO_ACCOUNT}:user/alice\n",
        "identities[1].role_arn", "user/alice", id="user-arn-not-role",
    ),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}{_IDENTITIES}  - subject: b\n", "identities[1].role_arn", "None",
                 id="missing-role-arn"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}{_IDENTITIES}  - role_arn: {ROLE_APP}\n", "identities[1].subject", "required",
                 id="missing-subject"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}{_IDENTITIES}  - just-a-string\n", "identities[1]", "mapping",
                 id="identity-not-a-mapping"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}{_IDENTITIES}  - subject: system:serviceaccount:a:a\n    role_arn: {ROLE_APP}2\n",
                 "identities[1].subject", "identities[0]", id="duplicate-subject"),
    pytest.param(f"issuer: {ISSUER}\naudiance: sts.amazonaws.com\n{_KEYS}{_IDENTITIES}", "audiance",
                 "did you mean 'audience'?", id="misspelt-key"),
    pytest.param(f"issuer: {ISSUER}\nlogging: debug\n{_KEYS}{_IDENTITIES}", "logging", "known keys: issuer",
                 id="unknown-key"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}{_IDENTITIES}    rolearn: x\n", "identities[0].rolearn",
                 "did you mean 'role_arn'?", id="misspelt-identity-key"),
    pytest.param(f"issuer: oidc.example.test/id/X\n{_KEYS}{_IDENTITIES}", "issuer", "not an https:// URL",
                 id="issuer-without-scheme"),
    pytest.param(f"issuer: http://oidc.example.test\n{_KEYS}{_IDENTITIES}", "issuer", "not an https:// URL",
                 id="issuer-over-http"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}identities:\n  - subject: system:serviceaccount:just-one\n"
                 f"    role_arn: {ROLE_APP}\n", "identities[0].subject", "<namespace>:<name>",
                 id="service-account-subject-without-name"),
    pytest.param(f"issuer: {ISSUER}\n{_KEYS}identities:\n  - subject: 'system:serviceaccount:a:b '\n"
                 f"    role_arn: {ROLE_APP}\n", "identities[0].subject", "spaces", id="subject-with-a-trailing-space"),
]


@pytest.mark.parametrize(("content", "field", "mentions"), BAD_FILES)
def test_a_bad_file_gives_one_line_naming_the_field(conf_dir: Path, content: str, field: str, mentions: str) -> None:
    path = conf_dir / "static.yaml"
    path.write_text(content)

    problems = problems_of(path)

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"static config {path}: {field}: "), problems
    assert mentions in problems[0]
    assert "\n" not in problems[0]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("- a\n- b\n", id="a-list"),
        pytest.param("just a string\n", id="a-string"),
        pytest.param("", id="empty-file"),
    ],
)
def test_a_document_that_is_not_a_mapping(conf_dir: Path, content: str) -> None:
    path = conf_dir / "static.yaml"
    path.write_text(content)

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"static config {path}: ")
    assert "mapping" in problems[0]


def test_unparseable_yaml_is_reported(conf_dir: Path) -> None:
    path = conf_dir / "static.yaml"
    path.write_text(f"issuer: [unclosed\njwks_file: keys/jwks.json\n{_IDENTITIES}")

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"static config {path}: not valid YAML at line 2, column 10: ")


def test_unparseable_yaml_is_one_line(conf_dir: Path) -> None:
    path = conf_dir / "static.yaml"
    path.write_text(f"issuer: [unclosed\njwks_file: keys/jwks.json\n{_IDENTITIES}")

    [problem] = problems_of(path)

    assert "\n" not in problem


def test_a_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    [problem] = problems_of(path)

    assert problem.startswith(f"static config {path}: cannot be read: ")


def test_several_problems_are_reported_at_once(conf_dir: Path) -> None:
    path = write(conf_dir / "static.yaml", f"""
        audience: ""
        identities:
          - subject: system:serviceaccount:a:a
            role_arn: {ROLE_APP}
          - subject: system:serviceaccount:b:b
            role_arn: not-an-arn
          - role_arn: {ROLE_APP}
    """)

    problems = problems_of(path)

    fields = [problem.removeprefix(f"static config {path}: ").split(": ", 1)[0] for problem in problems]
    assert fields == ["issuer", "audience", "jwks_file/jwks_url", "identities[1].role_arn", "identities[2].subject"]
    assert all("\n" not in problem for problem in problems)


# --- role_for ---


def directory(*rules: tuple[str, str]) -> StaticDirectory:
    return StaticDirectory([Rule(subject, role) for subject, role in rules], source="static config test.yaml")


async def test_an_exact_subject() -> None:
    rules = directory(("system:serviceaccount:my-app:default", ROLE_APP))

    assert await rules.role_for(identity("system:serviceaccount:my-app:default")) == ROLE_APP


async def test_a_glob() -> None:
    rules = directory(("system:serviceaccount:batch:*", ROLE_BATCH))

    assert await rules.role_for(identity("system:serviceaccount:batch:nightly")) == ROLE_BATCH
    assert await rules.role_for(identity("system:serviceaccount:batch:")) == ROLE_BATCH
    assert await rules.role_for(identity("system:serviceaccount:batch:a:b")) == ROLE_BATCH
    with pytest.raises(IdentityNotAllowedError):
        await rules.role_for(identity("system:serviceaccount:batchx:nightly"))
    with pytest.raises(IdentityNotAllowedError):
        await rules.role_for(identity("prefix:system:serviceaccount:batch:nightly"))


async def test_a_glob_in_the_middle() -> None:
    rules = directory(("system:serviceaccount:*:builder", ROLE_BATCH))

    assert await rules.role_for(identity("system:serviceaccount:ci:builder")) == ROLE_BATCH
    with pytest.raises(IdentityNotAllowedError):
        await rules.role_for(identity("system:serviceaccount:ci:builder-2"))


async def test_an_exact_subject_wins_over_a_glob_listed_earlier() -> None:
    rules = directory(
        ("system:serviceaccount:batch:*", ROLE_BATCH),
        ("system:serviceaccount:batch:special", ROLE_OTHER),
    )

    assert await rules.role_for(identity("system:serviceaccount:batch:special")) == ROLE_OTHER
    assert await rules.role_for(identity("system:serviceaccount:batch:plain")) == ROLE_BATCH


async def test_among_globs_the_first_in_the_file_wins() -> None:
    rules = directory(
        ("system:serviceaccount:batch:*", ROLE_BATCH),
        ("system:serviceaccount:*", ROLE_OTHER),
        ("system:serviceaccount:batch:night*", ROLE_APP),
    )

    assert await rules.role_for(identity("system:serviceaccount:batch:nightly")) == ROLE_BATCH
    assert await rules.role_for(identity("system:serviceaccount:web:app")) == ROLE_OTHER


async def test_the_order_of_the_file_is_kept_when_loaded(conf_dir: Path) -> None:
    path = write(conf_dir / "static.yaml", f"""
        issuer: {ISSUER}
        jwks_file: keys/jwks.json
        identities:
          - subject: "system:serviceaccount:*"
            role_arn: {ROLE_OTHER}
          - subject: "system:serviceaccount:batch:*"
            role_arn: {ROLE_BATCH}
          - subject: system:serviceaccount:batch:special
            role_arn: {ROLE_APP}
    """)

    _, loaded = load_static_config(path)

    assert await loaded.role_for(identity("system:serviceaccount:batch:nightly")) == ROLE_OTHER
    assert await loaded.role_for(identity("system:serviceaccount:batch:special")) == ROLE_APP


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        pytest.param("system:serviceaccount:a.b:*", "system:serviceaccount:a.b:x", True, id="dot-literal"),
        pytest.param("system:serviceaccount:a.b:*", "system:serviceaccount:aXb:x", False, id="dot-not-any-char"),
        pytest.param("system:serviceaccount:team+1:*", "system:serviceaccount:team+1:x", True, id="plus-literal"),
        pytest.param("system:serviceaccount:team+1:*", "system:serviceaccount:teamm1:x", False, id="plus-not-repeat"),
        pytest.param("repo:org/app?:*", "repo:org/app?:main", True, id="question-mark-literal"),
        pytest.param("repo:org/app?:*", "repo:org/ap:main", False, id="question-mark-not-optional"),
        pytest.param("repo:[ab]:*", "repo:a:main", False, id="brackets-not-a-class"),
        pytest.param("repo:[ab]:*", "repo:[ab]:main", True, id="brackets-literal"),
        pytest.param("a|b*", "b", False, id="pipe-not-alternation"),
        pytest.param("(x)*", "(x)y", True, id="parens-literal"),
        pytest.param("^x*$", "^xyz$", True, id="anchors-literal"),
        pytest.param("x\\d*", "x\\d1", True, id="backslash-literal"),
        pytest.param("x\\d*", "x1", False, id="backslash-not-an-escape"),
        pytest.param("*", "anything at all", True, id="star-alone"),
        pytest.param("a*b*c", "a-b-c", True, id="two-stars"),
        pytest.param("a*b*c", "a-c", False, id="two-stars-need-b"),
    ],
)
async def test_star_is_the_only_wildcard(pattern: str, subject: str, matches: bool) -> None:
    rules = directory((pattern, ROLE_BATCH))

    if matches:
        assert await rules.role_for(identity(subject)) == ROLE_BATCH
    else:
        with pytest.raises(IdentityNotAllowedError):
            await rules.role_for(identity(subject))


async def test_an_exact_subject_with_regex_characters_is_matched_literally() -> None:
    rules = directory(("user.name+tag@example.com", ROLE_APP))

    assert await rules.role_for(identity("user.name+tag@example.com")) == ROLE_APP
    with pytest.raises(IdentityNotAllowedError):
        await rules.role_for(identity("userXname+tag@example.com"))


async def test_an_unmapped_subject_is_not_allowed() -> None:
    rules = directory(("system:serviceaccount:batch:*", ROLE_BATCH), ("system:serviceaccount:a:a", ROLE_APP))

    with pytest.raises(IdentityNotAllowedError) as caught:
        await rules.role_for(identity("system:serviceaccount:web:frontend"))

    assert caught.value.code == "no_role"
    assert caught.value.status == 403
    assert "system:serviceaccount:web:frontend" in caught.value.message
    assert "static config test.yaml" in caught.value.message
