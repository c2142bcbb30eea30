"""The Grafana-managed alert rules (grafana/provisioning/alerting/alerts.yml) mirror the Prometheus rules
(grafana/prometheus/alerts.yml): what is expected of each Grafana rule is read off the Prometheus one."""

from __future__ import annotations

import operator
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

GRAFANA = Path(__file__).parents[2] / "grafana"
PROMETHEUS_RULES = GRAFANA / "prometheus" / "alerts.yml"
GRAFANA_RULES = GRAFANA / "provisioning" / "alerting" / "alerts.yml"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "datasources.yml"

# PromQL comparison -> Grafana threshold type (pkg/expr/threshold.go).
THRESHOLD_TYPES = {">": "gt", "<": "lt", ">=": "gte", "<=": "lte", "==": "eq", "!=": "ne"}
COMPARE = {">": operator.gt, "<": operator.lt, ">=": operator.ge, "<=": operator.le}
COMPARE.update({"==": operator.eq, "!=": operator.ne})
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
COMPARISON = rf"\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<number>{NUMBER})"
TRAILING = re.compile(rf"^(?P<query>.+?){COMPARISON}$")
WITH_ABSENT = re.compile(rf"^(?P<query>.+?){COMPARISON}\s+or\s+absent\((?P<selector>.+)\)$")
DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(duration: str) -> float:
    match = DURATION.match(duration)
    assert match, f"not a duration: {duration!r}"
    return int(match[1]) * SECONDS[match[2]]


def prometheus_rules() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load(PROMETHEUS_RULES.read_text())
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}


def grafana_groups() -> list[dict[str, Any]]:
    provisioning = yaml.safe_load(GRAFANA_RULES.read_text())
    assert provisioning["apiVersion"] == 1
    return provisioning["groups"]


def grafana_rules() -> dict[str, dict[str, Any]]:
    rules = [rule for group in grafana_groups() for rule in group["rules"]]
    titles = [rule["title"] for rule in rules]
    assert len(titles) == len(set(titles)), f"duplicate titles: {titles}"
    return {rule["title"]: rule for rule in rules}


def expected_query(expr: str) -> tuple[str, str, float, bool]:
    """(query, comparison, number, absent_fires) for a Prometheus alert expression: `Q op N`, or
    `Q op N or absent(S)` whose Grafana query is `Q or vector(0)` (no series at all reads as 0)."""
    expr = " ".join(expr.split())
    if match := WITH_ABSENT.match(expr):
        assert match["selector"] in match["query"], f"absent() of another selector than the query's: {expr}"
        return f"{match['query']} or vector(0)", match["op"], float(match["number"]), True
    match = TRAILING.match(expr)
    assert match, f"no Grafana equivalent known for {expr!r}: teach this test and alerts.yml the new form"
    return match["query"], match["op"], float(match["number"]), False


def by_ref(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    refs = [query["refId"] for query in rule["data"]]
    assert len(refs) == len(set(refs)), f"{rule['title']}: duplicate refIds {refs}"
    return {query["refId"]: query for query in rule["data"]}


def condition_chain(rule: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The condition (a threshold), the reduce it reads, and the data source query that reads."""
    data = by_ref(rule)
    assert rule["condition"] in data, f"{rule['title']}: condition {rule['condition']!r} is no refId"
    threshold = data[rule["condition"]]
    assert threshold["model"]["type"] == "threshold"
    reduce = data[threshold["model"]["expression"]]
    assert reduce["model"]["type"] == "reduce"
    assert reduce["model"]["reducer"] == "last"
    query = data[reduce["model"]["expression"]]
    for expression in (threshold, reduce):
        assert expression["datasourceUid"] == "__expr__"
        assert expression["model"]["refId"] == expression["refId"]
    assert query["model"]["refId"] == query["refId"]
    return threshold, reduce, query


def test_the_same_alerts_and_nothing_else() -> None:
    assert set(grafana_rules()) == set(prometheus_rules())


def test_groups_are_valid_provisioning() -> None:
    for group in grafana_groups():
        assert group["name"] and group["folder"]
        interval = seconds(group["interval"])
        assert interval > 0 and interval % 10 == 0, "a group interval is a multiple of Grafana's 10s scheduler tick"
        for rule in group["rules"]:
            assert seconds(rule["for"]) >= interval, f"{rule['title']}: `for` shorter than the interval"
            assert rule["noDataState"] in {"NoData", "Alerting", "OK", "KeepLast"}
            assert rule["execErrState"] in {"Error", "Alerting", "OK", "KeepLast"}
    uids = [rule["uid"] for group in grafana_groups() for rule in group["rules"]]
    assert len(uids) == len(set(uids)), f"duplicate uids: {uids}"
    for uid in uids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid), f"not a Grafana uid (40 characters at most): {uid!r}"


@pytest.mark.parametrize("title", sorted(prometheus_rules()))
def test_each_rule_mirrors_its_prometheus_rule(title: str) -> None:
    prometheus = prometheus_rules()[title]
    grafana = grafana_rules()[title]
    assert seconds(grafana["for"]) == seconds(prometheus["for"])
    assert grafana["labels"] == prometheus["labels"]
    # Labels and titles go through Grafana's environment-variable expansion: a `$` would be eaten.
    assert "$" not in title + "".join(grafana["labels"].values())
    # Grafana's `$value` is an evaluation string; the reduced number is `$values.<reduce refId>.Value`.
    threshold, reduce, query = condition_chain(grafana)
    value = f"$values.{reduce['refId']}.Value"
    annotations = {key: re.sub(r"\$value\b", value, text) for key, text in prometheus.get("annotations", {}).items()}
    assert grafana["annotations"] == annotations

    expr, comparison, number, absent_fires = expected_query(prometheus["expr"])
    assert " ".join(query["model"]["expr"].split()) == expr
    assert query["model"]["instant"] is True
    [condition] = threshold["model"]["conditions"]
    assert condition["evaluator"]["type"] == THRESHOLD_TYPES[comparison]
    assert [float(param) for param in condition["evaluator"]["params"]] == [number]
    if absent_fires:
        # `or vector(0)` stands for absent(): 0 must meet the threshold, and an empty answer alerts too.
        assert COMPARE[comparison](0, number)
        assert grafana["noDataState"] == "Alerting"
    else:
        # A Prometheus rule whose query returns nothing does not fire.
        assert grafana["noDataState"] == "OK"


def test_queries_go_to_the_provisioned_prometheus() -> None:
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    [prometheus] = [source for source in datasources if source["type"] == "prometheus"]
    for rule in grafana_rules().values():
        _, _, query = condition_chain(rule)
        assert query["datasourceUid"] == prometheus["uid"], rule["title"]
        assert query["model"]["datasource"] == {"type": "prometheus", "uid": prometheus["uid"]}, rule["title"]
        assert query["relativeTimeRange"]["from"] > query["relativeTimeRange"]["to"], rule["title"]


def test_the_translation_is_checked_not_assumed() -> None:
    assert expected_query("max by (replica) (t) >= 85") == ("max by (replica) (t)", ">=", 85.0, False)
    assert expected_query('sum(h{d="x"}) < 1 or absent(h{d="x"})') == ('sum(h{d="x"}) or vector(0)', "<", 1.0, True)
    with pytest.raises(AssertionError):
        expected_query("rate(x[5m])")  # no trailing comparison: nothing to translate
    with pytest.raises(AssertionError):
        expected_query("sum(a) < 1 or absent(b)")  # absent() of another series
