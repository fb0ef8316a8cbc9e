"""The device pages' pure parts (corral.server.console_device): the list's sort links, the
chart's time ranges as query parameters, the tag form as an API change, the web UI's port."""

from __future__ import annotations

import pytest

from corral.core.durations import parse_duration
from corral.errors import InvalidInput
from corral.server.api.devices import SORTS
from corral.server.console_device import (
    LIST_COLUMNS,
    TIME_RANGES,
    first_metric,
    list_sort,
    proxy_entry,
    range_params,
    sort_links,
    tag_change,
)


def test_every_sortable_column_is_an_order_the_api_knows() -> None:
    assert {c.sort for c in LIST_COLUMNS if c.sort} == {"id", "name", "last_seen", "version"}
    assert all(c.sort in SORTS for c in LIST_COLUMNS if c.sort)


@pytest.mark.parametrize(("given", "used"), [
    ("name", "name"), ("-version", "-version"), ("last_seen", "last_seen"), ("-id", "-id"),
    (None, "id"), ("", "id"), ("password", "id"), ("--name", "id"), ("created_at", "id"), ("name-", "id"),
])
def test_the_list_sorts_by_its_columns_only(given: str | None, used: str) -> None:
    assert list_sort(given) == used


def test_a_column_header_sorts_by_it_and_then_the_other_way() -> None:
    links = sort_links("id")
    assert set(links) == {"id", "name", "last_seen", "version"}
    assert (links["id"].sort, links["id"].aria) == ("-id", "ascending")
    assert (links["name"].sort, links["name"].aria) == ("name", "none")
    assert (links["last_seen"].sort, links["last_seen"].aria) == ("-last_seen", "none")  # most recent first
    again = sort_links("-id")
    assert (again["id"].sort, again["id"].aria) == ("id", "descending")
    by_seen = sort_links("-last_seen")
    assert (by_seen["last_seen"].sort, by_seen["last_seen"].aria) == ("last_seen", "descending")
    assert sort_links("version")["version"].sort == "-version"


def test_each_time_range_is_a_query_of_a_bounded_number_of_buckets() -> None:
    assert [r.key for r in TIME_RANGES] == ["15m", "1h", "6h", "24h", "7d"]
    for r in TIME_RANGES:
        params = range_params(r.key)
        assert params == {"since": r.key, "step": r.step, "agg": "avg"}
        assert parse_duration(params["since"]) == r.seconds
        buckets = r.seconds / parse_duration(params["step"])
        assert 60 <= buckets <= 200, (r.key, buckets)  # enough to see a shape, few enough to draw fast
    with pytest.raises(InvalidInput, match="15m, 1h, 6h, 24h, 7d"):
        range_params("2y")


def test_the_chart_opens_with_a_familiar_metric() -> None:
    assert first_metric(["app.queue", "cpu.percent", "mem.percent"]) == "cpu.percent"
    assert first_metric(["app.queue", "mem.percent"]) == "mem.percent"
    assert first_metric(["app.queue", "disk.percent"]) == "app.queue"
    assert first_metric([]) == ""


def test_the_tag_form_is_one_change_of_the_api() -> None:
    assert tag_change({"action": "set", "key": " site ", "value": "berlin"}) == ({"site": "berlin"}, [])
    assert tag_change({"action": "set", "key": "note"}) == ({"note": ""}, [])
    assert tag_change({"action": "remove", "key": "site", "value": "ignored"}) == ({}, ["site"])
    with pytest.raises(InvalidInput, match="needs a key"):
        tag_change({"action": "set", "key": "  ", "value": "x"})
    with pytest.raises(InvalidInput, match="set or remove"):
        tag_change({"action": "drop", "key": "site"})
    with pytest.raises(InvalidInput, match="set or remove"):
        tag_change({"key": "site"})


@pytest.mark.parametrize("port", ["0", "65536", "", "80x", "-1", "8 0", "１２", "²"])
def test_the_web_ui_needs_a_port_number(port: str) -> None:
    with pytest.raises(InvalidInput, match="1-65535"):
        proxy_entry("abc", port)


def test_the_web_ui_entry_is_the_proxy_url() -> None:
    assert proxy_entry("abc", "8080") == "/devices/abc/proxy/8080/"
    assert proxy_entry("abc", " 080 ") == "/devices/abc/proxy/80/"
