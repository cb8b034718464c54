"""The README says what the code does: its two first commands, every flag of `serve` and
`init-network` with its default, every metric the daemon exports, every alert."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from daemon import config, netsetup

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def table_rows(heading: str) -> dict[str, list[str]]:
    """The first markdown table after `heading`: first cell (backticks and flag metavars
    dropped) -> the other cells."""
    start = README.index(heading)
    rows: dict[str, list[str]] = {}
    header = True
    for line in README[start:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header or set(cells[0]) <= {"-", " "}:
                header = False
                continue
            key = cells[0].strip("`").split("`")[0].split(" ")[0]
            rows[key] = cells[1:]
        elif rows:
            break
    return rows


def test_the_readme_opens_with_the_demo_and_the_test_command_ci_runs() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    demo, tests = blocks[0], blocks[1]
    assert "irsa-cache demo" in demo and "'.[demo]'" in demo
    assert tests.endswith(".venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == tests, "CI runs the README's test command"
    assert README.index(demo) < README.index("## When to use it")


def test_every_serve_flag_is_in_the_configure_table_with_its_default() -> None:
    rows = table_rows("### Configure")
    for option in config.SERVE_OPTIONS:
        assert option.flag in rows, f"{option.flag} is missing from README, Configure"
        default = rows[option.flag][0]
        if option.default is not None and not option.flag_only:
            assert f"`{option.default}`" in default or option.default in default, (option.flag, default)
    assert set(rows) == {option.flag for option in config.SERVE_OPTIONS}, set(rows) ^ {o.flag for o in
                                                                                   config.SERVE_OPTIONS}


def test_every_init_network_flag_is_in_its_table() -> None:
    rows = table_rows("### Node network")
    assert set(rows) == {option.flag for option in netsetup.NETWORK_OPTIONS}


def test_every_metric_the_daemon_exports_is_documented() -> None:
    from prometheus_client import REGISTRY

    from daemon import app  # noqa: F401  (every module that defines a metric)

    exported = {family.name for family in REGISTRY.collect() if family.name.startswith("irsa_cache_")
                and not family.name.startswith("irsa_cache_webhook_")}
    documented = {re.sub(r"_total$", "", name) for name in re.findall(r"`(irsa_cache_[a-z_]+)`", README)}
    assert len(exported) > 25
    assert exported <= documented, sorted(exported - documented)


def test_every_metric_the_readme_names_is_exported() -> None:
    # In the tables and in the PromQL of the troubleshooting and sizing sections alike.
    from prometheus_client import REGISTRY

    from daemon import app  # noqa: F401  (every module that defines a metric)
    from daemon.webhook import metrics as webhook_metrics  # a registry of its own

    exported = {family.name for registry in (REGISTRY, webhook_metrics.REGISTRY) for family in registry.collect()
                if family.name.startswith("irsa_cache_")}
    named = {re.sub(r"_(total|bucket|sum|count|created)$", "", name)
             for name in re.findall(r"\b(irsa_cache_[a-z_]+)", README)}
    assert len(named) > 25
    assert named <= exported, sorted(named - exported)


def test_every_alert_is_in_the_monitoring_table() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    rows = table_rows("**Alerts.**")
    assert set(rows) == alerts, set(rows) ^ alerts


def test_every_file_the_readme_names_is_there() -> None:
    # `deploy/NAME` after a kubectl verb is a Deployment, not a file; bench/results/ is
    # what the benchmarks write, not part of a checkout.
    named = {match.group(1).rstrip(".") for match in re.finditer(
        r"(?<![\w/.-])(?<!exec )(?<!status )((?:deploy|bench|tests|daemon|docs|probes|\.ci)/[\w./-]*\w)", README)}
    assert len(named) > 30
    assert sorted(path for path in named if not (ROOT / path).exists() and not path.startswith("bench/results/")) == []
