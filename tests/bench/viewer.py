"""Benchmark of issue 13: OHIF in headless Chromium opening the 200-image CT.

The same viewer dist, the same browser, the same emulated link (100 Mbit/s, 40 ms RTT by
default; tests/bench/wanproxy.py), two ways to the images:
- relay: the workstation serves the viewer and DICOMweb on loopback; its WAN side is the
  link to the gateway; the hospital is tests/bench/wan.py's (embedded PACS with the
  study, gateway, agent). The study cache is wiped before each run (cold reads).
- direct: Orthanc's own DICOMweb plugin (Debian orthanc-dicomweb) holding the same study
  in its network namespace, across the same kind of link; the viewer is served locally
  with Orthanc's documented OHIF settings (tests/bench/viewer_sides.py).

Each run is a fresh browser profile opening `/viewer?StudyInstanceUIDs=...`; runs
alternate between the two. Times are the page's own (tests/bench/viewer_probe.py), from
the navigation: the first image on screen, and the last of the series' frames received.

    python -m tests.bench.run viewer             # writes docs/BENCHMARKS.md
    python -m tests.bench.viewer --runs 1        # prints the section only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.bench.procs import (
    HOST,
    VENV_BIN,
    BenchError,
    ProcessGroup,
    raise_nofile,
    wait_for_quiet,
)
from tests.bench.report import DOC, Section, machine_line, median, write_section
from tests.bench.targets import BenchPki, make_pki
from tests.bench.wan_chain import ENV, Knobs, start_hospital, start_site
from tests.bench.wan_net import MBIT, PROFILES, Profile, check_link, start_proxy
from tests.bench.wan_pacs import DEFAULT_COUNT, study_uid

OPEN_TIMEOUT: Final = 600.0  # seconds for one opening of the study
QUIET_PATIENCE: Final = 20.0  # seconds to wait for a quiet machine before each run
CASES: Final = ("relay", "direct", "plain")  # plain: the relay with PLAIN's settings
PLAIN: Final = "headers_first: true"  # what the baseline workstation does differently
FIRST_IMAGE_NOTE: Final = (
    "Headers first (`dicomweb.headers_first: true`, docs/internals/dicomweb.md): a "
    "headers-only retrieval of the series beside its retrieval answers OHIF's metadata "
    "request. It helped while the agent surveyed each study before its C-GET (main at "
    "c6e0648: first image 4.09 s with it, 4.75 s without); since the survey runs beside "
    "the retrieve the series alone is sooner and headers first is off by default. Before "
    "headers first (c6e0648, 5 runs): first image 3.90 s through the relay against 3.56 s "
    "from Orthanc (0.91x), all images 6.39 s against 9.69 s (1.52x)."
)


@dataclass(frozen=True)
class Opening:
    first: float  # seconds from navigation to the first image on screen
    last: float  # seconds from navigation to the last frame received
    dicomweb_start: float  # seconds from navigation to the first DICOMweb request
    frames: int
    bytes: int
    other_load: float = 0.0  # cores busy outside the benchmark just before the run
    metadata: float = 0.0  # seconds to the first series metadata answer received
    first_asked: float = 0.0  # seconds to the first frame request


def _dist() -> Path:
    from relay.workstation.viewer.install import default_viewer_dir, installed_release

    dist = default_viewer_dir()
    if installed_release(dist) is None:
        raise BenchError(f"no OHIF viewer in {dist}: run `relay viewer install`")
    return dist


def open_study(profile_dir: Path, url: str, count: int) -> Opening:
    """One fresh headless Chromium opening `url`, until all `count` frames arrived."""
    from tests.bench.viewer_probe import install_probe, page_state
    from tests.browser.chromium import chromium

    with chromium(profile_dir) as driver:
        install_probe(driver)
        driver.get(url)
        deadline = time.monotonic() + OPEN_TIMEOUT
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = page_state(driver)
            if state["frames"] >= count and state["first"] is not None:
                return Opening(
                    first=state["first"] / 1000, last=state["last"] / 1000,
                    dicomweb_start=(state["dicomweb_start"] or 0) / 1000,
                    frames=state["frames"], bytes=state["bytes"],
                    metadata=(state["metadata_end"] or 0) / 1000,
                    first_asked=(state["first_frame_asked"] or 0) / 1000,
                )  # fmt: skip
            time.sleep(0.1)
        raise BenchError(f"{url}: not all {count} frames within {OPEN_TIMEOUT:.0f} s ({state})")


def _wipe_cache(config: Path) -> None:
    from relay.workstation.cache.cli import call

    call(config, "cache-wipe", {})


def measure(
    workdir: Path, bench_pki: BenchPki, *, runs: int, count: int, profile: Profile,
    plain: str = PLAIN,
) -> tuple[dict[str, list[Opening]], Any]:  # fmt: skip
    from relay_dev.samples import make_study
    from tests.bench.viewer_sides import ORTHANC_OPTIONS, ViewerFront, orthanc_dicomweb
    from tests.browser.chromium import require_chromium

    try:
        require_chromium()
    except BaseException as exc:  # pytest's skip outside pytest
        raise BenchError(f"headless Chromium is needed: {exc}") from None
    dist = _dist()
    uid = study_uid(count)
    results: dict[str, list[Opening]] = {case: [] for case in CASES}
    with ProcessGroup(workdir) as group:
        hospital = start_hospital(group, bench_pki, workdir, count, Knobs())
        check = check_link(group, profile, ENV)
        extra = (
            f"cache: {{dir: '{workdir / 'ws-cache'}', max_size: 2GiB}}\n"
            f"dicomweb: {{listen: '{HOST}:0', viewer: true, viewer_dir: '{dist}'}}\n"
        )
        site = start_site(
            group, bench_pki, workdir, hospital=hospital, profile=profile, knobs=Knobs(),
            extra_config=extra,
        )  # fmt: skip
        config = workdir / f"workstation-{profile.name}.yaml"
        relay_port = site.workstation.listening("dicomweb", 30.0)
        # the baseline in the same run: a second workstation (same link, same device
        # certificate) with headers first turned off
        plain_config = workdir / "workstation-plain.yaml"
        plain_config.write_text(
            config.read_text()
            .replace(str(workdir / "ws-cache"), str(workdir / "ws-cache-plain"))
            .replace("viewer: true,", f"viewer: true, {plain},")
        )
        plain_ws = group.process("workstation-plain",
                              [str(VENV_BIN / "relay"), "workstation", "--config",
                               str(plain_config)], env=ENV)  # fmt: skip
        plain_port = plain_ws.listening("dicomweb", 30.0)
        configs = {"relay": config, "plain": plain_config}
        with orthanc_dicomweb(workdir, make_study(count)) as orthanc_port:
            _, proxy_port = start_proxy(group, "proxy-orthanc", orthanc_port, profile, ENV)
            with ViewerFront(dist, proxy_port, ORTHANC_OPTIONS) as front:
                bases = {"relay": relay_port, "direct": front.port, "plain": plain_port}
                for case in CASES:  # unmeasured: first starts, lazy imports, OS caches
                    if case in configs:
                        _wipe_cache(configs[case])
                    url = f"http://{HOST}:{bases[case]}/viewer?StudyInstanceUIDs={uid}"
                    open_study(workdir / f"chromium-{case}-warm", url, count)
                for i in range(runs):
                    for case in CASES if i % 2 == 0 else CASES[::-1]:
                        if case in configs:
                            _wipe_cache(configs[case])
                        load = wait_for_quiet(patience=QUIET_PATIENCE)
                        url = f"http://{HOST}:{bases[case]}/viewer?StudyInstanceUIDs={uid}"
                        opening = open_study(workdir / f"chromium-{case}-{i}", url, count)
                        opening = dataclasses.replace(opening, other_load=load)
                        results[case].append(opening)
                        print(f"viewer {case}: first image {opening.first:.2f} s, all "
                              f"{opening.last:.2f} s (other load before: {load:.2f} cores; "
                              f"series metadata at {opening.metadata:.2f} s, first frame "
                              f"asked at {opening.first_asked:.2f} s)", flush=True)  # fmt: skip
    return results, check


def run(
    workdir: Path, bench_pki: BenchPki, *, runs: int = 3, count: int = DEFAULT_COUNT,
    profile: Profile = PROFILES[0], plain: str = PLAIN,
) -> Section:  # fmt: skip
    load_before = os.getloadavg()[0]
    results, check = measure(workdir, bench_pki, runs=runs, count=count, profile=profile,
                             plain=plain)  # fmt: skip
    load_after = os.getloadavg()[0]

    def med(case: str, attr: str) -> float:
        return median([getattr(o, attr) for o in results[case]])

    def each(case: str, attr: str) -> str:
        return ", ".join(f"{getattr(o, attr):.2f}" for o in results[case])

    table = [["OHIF opening the CT", "first image (s)", "all images (s)", "runs: first / all"]]
    labels = {
        "relay": "through the relay (workstation DICOMweb, cold cache)",
        "direct": f"Orthanc's DICOMweb plugin across {profile.label}",
        "plain": f"through the relay, `{plain}` (the baseline)",
    }
    for case in CASES:
        table.append([labels[case], f"{med(case, 'first'):.2f}", f"{med(case, 'last'):.2f}",
                      f"{each(case, 'first')} / {each(case, 'last')}"])  # fmt: skip
    verdicts = []
    for attr, name in (("first", "first image"), ("last", "all images")):
        ratio = med("direct", attr) / med("relay", attr)
        verdict = "meets" if ratio > 1 else "MISSES"
        verdicts.append(f"{name}: direct/relay = **{ratio:.2f}x** ({verdict} the goal: faster)")
        gain = med("plain", attr) / med("relay", attr)
        verdicts.append(f"{name}: `{plain}` / default = {gain:.2f}x")
    notes = [
        "; ".join(verdicts) + ".",
        f"{count} CT slices of 512x512 16-bit; link check through the proxy: "
        f"{check.rate / MBIT:.1f} Mbit/s, RTT {check.rtt * 1000:.1f} ms. Medians of {runs} "
        "runs each, alternating, after one unmeasured opening each (first starts, lazy "
        "imports, OS caches); a fresh Chromium profile per run; the relay's study cache "
        "wiped before each of its runs (the browser's retrievals are written through to it).",
        "Other load (cores busy outside the benchmark, in the second before each run, after "
        f"waiting up to {QUIET_PATIENCE:.0f} s for it to fall under 0.3): relay "
        f"{each(case='relay', attr='other_load')}; direct "
        f"{each(case='direct', attr='other_load')}; `{plain}` "
        f"{each(case='plain', attr='other_load')}.",
        "Times are from the navigation to /viewer, so both include the viewer's own start "
        f"from loopback (first DICOMweb request after {med('relay', 'dicomweb_start'):.2f} s "
        f"(relay) / {med('direct', 'dicomweb_start'):.2f} s (direct), median).",
        "On the page's clock (median): the first series metadata answer received at "
        f"{med('relay', 'metadata'):.2f} s (relay) / {med('direct', 'metadata'):.2f} s "
        f"(direct) / {med('plain', 'metadata'):.2f} s (`{plain}`); the first frame "
        f"asked for at {med('relay', 'first_asked'):.2f} s / "
        f"{med('direct', 'first_asked'):.2f} s / {med('plain', 'first_asked'):.2f} s.",
        "Frames arrive as WADO-RS /frames responses (imageRendering wadors); 'all images' "
        "is the last of the series' frames received (OHIF's study prefetcher loads the "
        "whole series).",
        "The relay's workstation starts fetching the study when it serves the page for "
        "/viewer?StudyInstanceUIDs= (the warm-up, docs/internals/viewer.md), so the series "
        "crosses the link while OHIF boots; OHIF cannot show a slice before it has the "
        "whole series' metadata (Orthanc answers it from its database and sends frames on "
        "demand; the relay from the headers-only retrieval).",
        FIRST_IMAGE_NOTE,
        f"Machine: 1-minute load average {load_before:.1f} before the runs and "
        f"{load_after:.1f} after (2 cores, shared with other work); the relay's side is "
        "five processes (PACS, agent, gateway, workstation, proxy) beside Chromium, "
        "Orthanc's two and a pass-through (Orthanc, proxy, the page's /dicom-web "
        "forwarder), so load elsewhere slows the relay more.",
    ]
    return Section("viewer", "OHIF in the browser: opening the CT (issue 13)", machine_line(),
                   table, notes)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.viewer", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument(
        "--plain",
        default=PLAIN,
        help="the baseline workstation's dicomweb settings (YAML flow items)",
    )
    parser.add_argument("--write", action="store_true", help=f"write the section into {DOC}")
    args = parser.parse_args(argv)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-viewer-"))
    try:
        out = run(workdir, make_pki(workdir / "pki"), runs=args.runs, count=args.count,
                  plain=args.plain)  # fmt: skip
    except BenchError as exc:
        print(f"viewer FAILED: {exc}\nprocess logs kept in {workdir}", file=sys.stderr)
        return 1
    print(out.render())
    if args.write:
        write_section(out)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
