"""`dicomweb.progressive`: the app-config the listener serves asks OHIF for two stages of
byte ranges over HTJ2K (what cornerstone's loader reads, relay/workstation/viewer/
progressive.py); turned off, OHIF keeps its own default (one streaming stage)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from relay.ops.config import Address
from relay.workstation.dicomweb import media
from relay.workstation.dicomweb.settings import DicomwebConfig
from relay.workstation.viewer.progressive import ACCEPT, CHUNK_SIZE, stack_retrieve_options
from tests.workstation.viewer.test_routes import fetch, install, started
from tests.workstation.viewer.test_site import config_of


def test_the_stages_are_a_first_range_then_the_rest_on_the_same_url() -> None:
    spec = stack_retrieve_options()["$set"]
    assert [s["retrieveType"] for s in spec["stages"]] == ["singleFast", "singleFinal"]
    options = spec["retrieveOptions"]
    fast, final = options["singleFast"], options["singleFinal"]
    assert fast["rangeIndex"] == 0 and fast["chunkSize"] == CHUNK_SIZE
    assert final["rangeIndex"] == -1 and options["default"] == final  # the prefetcher's
    # one URL for both: cornerstone appends the second range to the first only then
    assert fast["urlArguments"] == final["urlArguments"]
    name, _, value = fast["urlArguments"].partition("=")
    assert name == "accept" and unquote(value) == ACCEPT
    ranges = media.parse_accept(ACCEPT)
    assert [r.type for r in ranges] == ["image/jphc", "multipart/related"]
    assert ranges[1].params["transfer-syntax"] == "*"  # what cannot be HTJ2K: as stored


@pytest.mark.parametrize("progressive", [True, False])
async def test_the_served_app_config_follows_the_key(tmp_path: Path, progressive: bool) -> None:
    config = DicomwebConfig(Address("127.0.0.1", 0), viewer_dir=install(tmp_path),
                            progressive=progressive)  # fmt: skip
    srv = await started(config)
    assert srv.address is not None
    try:
        url = f"http://127.0.0.1:{srv.address.port}/app-config.js"
        status, _, body = await fetch(url)
    finally:
        await srv.stop()
    assert status == 200
    source = config_of(body.decode())["dataSources"][0]["configuration"]
    if progressive:
        assert source["stackRetrieveOptions"] == stack_retrieve_options()
    else:
        assert "stackRetrieveOptions" not in source
