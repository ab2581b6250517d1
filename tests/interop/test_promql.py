"""The PromQL reading that the dashboard and rule checks rest on (no Prometheus needed)."""

from __future__ import annotations

import pytest

from .harness.promql import (
    grouping_labels,
    legend_labels,
    metric_name,
    substitute,
    vector_selectors,
)


def test_selectors_of_a_rule_with_every_kind_of_clause() -> None:
    expr = (
        'sum by (site, outcome) (rate(relay_streams_total{job="x",site=~"$site"}'
        "[$__rate_interval])) / on (site) group_left () count(up == 1) > 0.5 and "
        "histogram_quantile(0.9, sum by (le) "
        "(rate(relay_dicom_operation_duration_seconds_bucket[5m])))"
        " - time() < 7 * 86400 unless bogus_metric offset 5m"
        ' or absent(relay_links{role="agent"}) or max without (role) (x:recorded:rate1m)'
    )
    assert vector_selectors(expr) == [
        'relay_streams_total{job="x",site=~"$site"}',
        "up",
        "relay_dicom_operation_duration_seconds_bucket",
        "bogus_metric",
        'relay_links{role="agent"}',
        "x:recorded:rate1m",
    ]
    assert grouping_labels(expr) == {"site", "outcome", "le"}


def test_braces_and_words_inside_strings_are_not_selectors() -> None:
    expr = 'a{l=~"}by(x) sum{", m!="rate(b)"} + c{n=`{`}'
    assert vector_selectors(expr) == ['a{l=~"}by(x) sum{", m!="rate(b)"}', "c{n=`{`}"]
    assert metric_name(vector_selectors(expr)[0]) == "a"
    assert grouping_labels('sum by (job) (x{l="on (fake)"})') == {"job"}


def test_aggregations_and_keywords_are_not_metrics() -> None:
    expr = 'sum(rate(a[1m])) and bool b or count_values("v", c) unless topk(3, d) offset 1h'
    assert vector_selectors(expr) == ["a", "b", "c", "d"]


def test_legend_labels_and_grafana_variables() -> None:
    assert legend_labels("p50 {{operation}} {{ job }}") == {"operation", "job"}
    assert legend_labels("up") == set()
    expr = 'rate(x{site=~"$site",ds="${datasource}"}[$__rate_interval])'
    assert substitute(expr, {"site": "main", "datasource": "p", "__rate_interval": "1m"}) == (
        'rate(x{site=~"main",ds="p"}[1m])'
    )
    with pytest.raises(KeyError, match="site"):
        substitute(expr, {})
