"""Just enough PromQL reading to check a dashboard or a rule against a real Prometheus.

A query that names a metric or a label the exporters do not have is not an error in
PromQL: it returns nothing, or series without that label. So the checks take the
expressions apart: the vector selectors in them (each must select series), the labels
they group by and the labels their legends show (each must be on the result).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: Words that look like metric names but are PromQL's own.
KEYWORDS = frozenset(
    {
        # aggregation operators (`sum by (x) (...)`: not followed by a parenthesis)
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile",
        # modifiers and binary operators
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
        "unless", "offset", "atan2", "inf", "nan",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_MODIFIER = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_GROUPING = re.compile(r"\b(?:by|on)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_LEGEND = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def _blank(text: str, pattern: re.Pattern[str], keep_ends: bool = False) -> str:
    """`text` with every match of `pattern` replaced by spaces (offsets are kept)."""

    def spaces(m: re.Match[str]) -> str:
        s = m.group(0)
        return s[0] + " " * (len(s) - 2) + s[-1] if keep_ends else " " * len(s)

    return pattern.sub(spaces, text)


def _closing_brace(masked: str, start: int) -> int:
    """The index of the `}` that closes the `{` at `start` (strings already blanked)."""
    end = masked.find("}", start)
    if end < 0:
        raise ValueError(f"unclosed label matcher at {start}: {masked!r}")
    return end


def vector_selectors(expr: str) -> list[str]:
    """Every vector selector in `expr` (`name` or `name{matchers}`), range and offset left out.

    >>> vector_selectors('rate(a_total{job="x",l=~"}"}[5m]) / on (l) b > 0')
    ['a_total{job="x",l=~"}"}', 'b']
    """
    no_strings = _blank(expr, _STRING, keep_ends=True)
    masked = _blank(no_strings, _BRACKETS)
    masked = _blank(masked, _MODIFIER)
    masked = re.sub(r"\{[^{}]*\}", lambda m: "{" + " " * (len(m.group(0)) - 2) + "}", masked)
    found = []
    for match in _IDENT.finditer(masked):
        name, end = match.group(0), match.end()
        rest = masked[end:].lstrip()
        if name.lower() in KEYWORDS or rest.startswith("("):
            continue
        brace = end + (len(masked[end:]) - len(rest))
        if rest.startswith("{"):
            found.append(expr[match.start() : _closing_brace(no_strings, brace) + 1])
        else:
            found.append(name)
    return found


def metric_name(selector: str) -> str:
    """The metric name of a selector from `vector_selectors`."""
    return selector.split("{", 1)[0]


def grouping_labels(expr: str) -> set[str]:
    """The labels named in `by (...)` and `on (...)` clauses of `expr`."""
    text = _blank(expr, _STRING, keep_ends=True)
    return {
        label.strip()
        for group in _GROUPING.findall(text)
        for label in group.split(",")
        if label.strip()
    }


def legend_labels(legend: str) -> set[str]:
    """The labels a Grafana legend format shows (`{{site}} {{outcome}}`)."""
    return set(_LEGEND.findall(legend))


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with Grafana's `$name` and `${name}` replaced; KeyError for an unknown one."""

    def value(m: re.Match[str]) -> str:
        return variables[m.group(1) or m.group(2)]

    return _VARIABLE.sub(value, expr)
