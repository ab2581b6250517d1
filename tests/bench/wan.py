"""Benchmark of issue 3: a CT study retrieved across an emulated WAN, relay vs direct DICOM.

One PACS (tests/bench/wan_pacs.py: 200 slices of 512x512 16-bit CT, about 105 MB), one
`relay gateway` and one `relay agent` run on 127.0.0.1 with no emulated delay: the
hospital. For each link profile, a delay/rate proxy (tests/bench/wan_net.py) stands for
the WAN, twice: in front of the gateway, where `relay workstation` connects, and in front
of the PACS. DCMTK `getscu` then retrieves the study (a) from the workstation's local
DICOM node, through the relay, and (b) straight from the PACS through the second proxy,
alternately, `runs` times each; medians are reported. A last row repeats both on plain
loopback with no proxy: what the processes manage when only CPU limits them.

    python -m tests.bench.run wan                  # the full benchmark, writes the doc
    python -m tests.bench.wan --profiles 100M-40ms --runs 1 \
        --limits '{stream_window: 4MiB}' --compression-level 1   # try config knobs

The physical limit of a retrieval is the compressed bytes the agent sent (its
relay_bytes_total{direction="sent",stage="compressed"} over the run) divided by the
nominal link rate, plus HANDSHAKE_RTTS round trips (TLS 1.3 and the DICOM association;
the relay's link is already up when getscu starts, so its real cost is at most one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import zstandard

from relay.dicom.pacs_target import PacsTarget
from relay_dev.samples import make_study
from tests.bench.procs import BenchError, ProcessGroup, raise_nofile, wait_for_quiet
from tests.bench.report import DOC, Section, machine_line, median, write_section
from tests.bench.targets import SHIM_NOTE, BenchPki, gateway_needs_shim, make_pki
from tests.bench.wan_chain import (
    NODE_AE,
    PACS_AE,
    Hospital,
    Knobs,
    Retrieval,
    Tally,
    image_find_seconds,
    retrieve,
    start_hospital,
    start_site,
)
from tests.bench.wan_net import LOOPBACK, MBIT, PROFILES, LinkCheck, Profile, check_link
from tests.bench.wan_pacs import DEFAULT_COUNT, REAL_CT, STUDIES, study_uid

HANDSHAKE_RTTS: Final = 2
SPEEDUP_TARGET: Final = 3.0  # at TARGET_PROFILE
TARGET_PROFILE: Final = "100M-40ms"
LIMIT_TARGET: Final = 1.3
# Issue 14 (pixel codecs): speed-up over direct per link, and the first image no later.
CODEC_SPEEDUP_TARGETS: Final = {"100M-40ms": 6.0, "20M-80ms": 5.0, "1G-5ms": 1.2}
MB: Final = 1e6
CASES: Final = ("relay", "direct")
QUIET: Final = 0.3  # cores of other load under which a retrieval counts as clean
WAIT_QUIET: Final = 5.0  # seconds to wait for that before each retrieval, at most
SHORT: Final = 15.0  # retrievals up to this long are measured again after a busy one
TRIES: Final = 3
RETRY_BUDGET: Final = 90.0  # seconds all the waiting and re-measuring may take
ZSTD_SAMPLE: Final = 20  # slices compressed to measure zstd's speed on this machine

#: Why the relay falls short where it does, and what code would change it. Mechanisms only:
#: the numbers they rest on are in the generated notes above them.
FINDINGS: Final = (
    "Findings (from the runs made when this benchmark was written, on a quiet machine and on "
    "busy ones; no relay code was changed for it):",
    "1. CPU is what limits the relay at 1 Gbit/s, and at 100 Mbit/s it is close: the relay's "
    "time at 1 Gbit/s is about its loopback time (last row), and its loopback time is already"
    " above the 100 Mbit/s limit of 3.43 s. The relay chain costs three to four times the CPU"
    " of direct DICOM (see 'CPU seconds per retrieval'): the PACS's pynetdicom sends once in "
    "both cases, but the relay adds a pynetdicom receive at the agent (C-GET SCU with SCP "
    "role), zstd, TLS, the gateway, and a pynetdicom send at the workstation (C-STORE to the "
    "viewer in the viewer's PDU size, 16 KiB for getscu). Here all of it shares 2 cores with "
    "the PACS, getscu, the proxies and whatever else runs: on a quiet machine the relay met "
    "1.3x at 100 Mbit/s (1.26x, 4.25x faster than direct), while runs with 0.6-1.5 cores of "
    "other load gave 1.65x to 3.45x the limit (and only 1.65x to 3.43x faster than direct).",
    "2. Not the tunnel's windows or pipelining: at 20 Mbit/s, where CPU is plentiful, the "
    "relay's median was 1.03-1.07x the limit in every run of the benchmark, busy or not (one "
    "instance per 84 ms where its bytes need 83.8 ms). Config knobs tried at 100 Mbit/s / 40 "
    "ms and on loopback (2-3 runs each): stream_window 4 and 8 MiB with link_window 32 MiB "
    "(the 1 MiB default is already twice the 100 Mbit/s x 40 ms product), max_frame 1 MiB, "
    "compression_level 1 (15% more bytes: 48.3 MB instead of 41.9): none moved the relay's "
    "time or CPU beyond run-to-run noise.",
    "3. Time to first instance (issue 14; rewritten 2026-12-06): the agent no longer "
    "surveys before the C-GET (the survey runs beside it, and only while the PACS's "
    "counts are unknown), proposes the storage contexts this PACS's studies held, and "
    "keeps one spare association after each request for up to pacs.spare_association (20 "
    "s), which the next find or retrieve takes (the per-run notes say in how many relay "
    "runs; at the slow links a direct run between two relay runs outlasts it). Decoding "
    "getscu's 17 KB A-ASSOCIATE-RQ at the workstation's node took 9.9 ms of its 21 ms "
    "accept; with each UID checked once and pydicom's `is_valid` remembered, 3.4 ms. "
    "Traced at both ends (by hand), the PACS's count and the first instance reach the "
    "workstation within 0.2-7 ms of each other: pynetdicom's C-GET SCP wants the count "
    "first, and the PACS sends it 10-12 ms after its first C-STORE. At 1 Gbit/s and 5 ms "
    "the relay's first instance is level with direct within this machine's noise (a mean "
    "of 3 ms behind in an A/B of three rounds), not ahead. Left alone: pynetdicom's PDU "
    "decoding and its reactor's 1 ms polling at both ends. Since 2026-12-07 a session's "
    "next stream sends its first instance for the link its last stream measured (zstd at "
    "level 1 on a fast one: 1.3 ms to encode and 0.7 to decode, against HTJ2K's 2.8 and "
    "3.5); traced hop by hop, that takes about 4 ms off the instance's own path, and the "
    "PACS's count, which pynetdicom's C-GET SCP at the workstation must have first, then "
    "arrives a median 5.8 ms after the instance: the count's path (our C-STORE answer, the "
    "PACS's pending response, a ~100-byte message through both ends' loops, the gateway and "
    "the link) is what holds the first image now (docs/BENCHMARKS.md, 2026-12-07).",
    "4. Per-instance cost in Python at both ends: pynetdicom's reactor threads poll (1 ms "
    "sleeps) and handle every P-DATA PDU in Python; py-spy (by hand, not part of the "
    "benchmark) shows them and zstd as the agent's and the workstation's top costs (the "
    "polling alone shows in the PACS's CPU, which grows with the length of the transfer). "
    "zstd level 3 runs at the speed given above per core on this VM, so at 1 Gbit/s "
    "compression costs more CPU time than the link time it saves: an adaptive level (or "
    "zstd's negative 'fast' levels, which the config's 1-19 range forbids) would help fast "
    "links, and a multi-threaded zstd context (`threads=`) would spread it over cores.",
    "5. At 1 Gbit/s and 5 ms, direct DICOM loses only 200 x 5 ms to its per-instance round "
    "trips, less than the relay's extra CPU costs on a shared 2-core machine, hence 'never "
    "slower' fails there (0.91x quiet, 0.60-0.85x busy). On separate machines (agent in the "
    "hospital, workstation on the PC) each end's CPU would overlap with the link instead of "
    "competing for the same 2 cores; one VM cannot show that.",
)


@dataclass
class ProfileResult:
    profile: Profile
    check: LinkCheck | None
    runs: dict[str, list[Retrieval]] = field(default_factory=lambda: {case: [] for case in CASES})

    def med(self, case: str, attr: str) -> float:
        return median([float(getattr(r, attr)) for r in self.runs[case]])

    def cpu(self, case: str, name: str) -> float:
        """Median CPU seconds of process `name` (profile suffix dropped) per retrieval."""
        return median(
            [
                sum(v for k, v in r.cpu.items() if k.removesuffix(f"-{self.profile.name}") == name)
                for r in self.runs[case]
            ]
        )

    @property
    def speedup(self) -> float:
        return self.med("direct", "last") / self.med("relay", "last")

    @property
    def compressed(self) -> float:
        return self.med("relay", "compressed")

    @property
    def limit(self) -> float | None:
        """Compressed bytes at the nominal rate plus the handshake round trips, seconds."""
        if self.profile.rate is None:
            return None
        return self.compressed / self.profile.rate + HANDSHAKE_RTTS * self.profile.rtt

    @property
    def to_limit(self) -> float | None:
        limit = self.limit
        return None if limit is None else self.med("relay", "last") / limit

    def verdicts(self) -> list[tuple[str, bool]]:
        if self.to_limit is None:
            return []
        out = []
        if self.profile.name == TARGET_PROFILE:
            out.append((f"≥ {SPEEDUP_TARGET:g}x direct", self.speedup >= SPEEDUP_TARGET))
        out.append(("never slower", self.speedup >= 1.0))
        out.append((f"≤ {LIMIT_TARGET:g}x limit", self.to_limit <= LIMIT_TARGET))
        return out

    def codec_verdicts(self) -> list[tuple[str, bool]]:
        """Issue 14's targets: a speed-up per link, the first image no later than direct."""
        target = CODEC_SPEEDUP_TARGETS.get(self.profile.name)
        if target is None:
            return []
        first = self.med("relay", "first") <= self.med("direct", "first")
        return [(f"≥ {target:g}x direct", self.speedup >= target), ("first image", first)]


class Quiet:
    """Measure when the machine is quiet, within a time budget for the whole benchmark.

    Before each retrieval, wait (up to WAIT_QUIET s) for other load under QUIET cores; a
    retrieval shorter than SHORT s that saw more is measured again, up to TRIES times,
    keeping the quietest, while the budget (seconds spent waiting and re-measuring) lasts.
    """

    def __init__(self, budget: float) -> None:
        self.left = budget
        self.retried = 0

    def measure(self, once: Callable[[], Retrieval]) -> Retrieval:
        best: Retrieval | None = None
        for attempt in range(TRIES):
            started = time.monotonic()
            wait_for_quiet(QUIET, patience=max(0.0, min(WAIT_QUIET, self.left)))
            self.left -= max(0.0, time.monotonic() - started - 1.0)
            sample = once()
            if best is not None:
                self.left -= sample.seconds
                self.retried += 1
            if best is None or sample.other_load < best.other_load:
                best = sample
            if (
                best.other_load < QUIET
                or sample.seconds > SHORT
                or sample.seconds > self.left
                or attempt == TRIES - 1
            ):
                break
            print(f"  (other load {sample.other_load:.2f} cores: measuring again)", flush=True)
        assert best is not None
        return best


def _timeout(profile: Profile, raw_bytes: float, count: int) -> float:
    """Generous bound for one getscu: 3x (bytes at the rate + a round trip per instance)."""
    rate = profile.rate or 20 * MB
    return 3 * (raw_bytes / rate + count * profile.rtt) + 60


def run_profile(
    bench_pki: BenchPki,
    workdir: Path,
    hospital: Hospital,
    profile: Profile,
    *,
    runs: int,
    count: int,
    knobs: Knobs,
    out_dir: Path,
    quiet: Quiet,
) -> ProfileResult:
    uid = study_uid(count)
    raw_bytes = count * 530_000.0
    with ProcessGroup(workdir) as group:
        check = None
        if profile.emulated:
            check = check_link(group, profile, {"TCP_NODELAY": "1"})
            print(
                f"wan {profile.label}: raw TCP through the proxy "
                f"{check.rate / MBIT:.1f} Mbit/s, RTT {check.rtt * 1000:.1f} ms",
                flush=True,
            )
        else:
            print(f"wan {profile.label}", flush=True)
        site = start_site(
            group, bench_pki, workdir, hospital=hospital, profile=profile, knobs=knobs
        )
        result = ProfileResult(profile, check)
        ours = [*hospital.procs, *site.procs]
        for i in range(runs):
            for case in CASES if i % 2 == 0 else CASES[::-1]:
                relay = case == "relay"

                def once(
                    relay: bool = relay, case: str = case, raw_bytes: float = raw_bytes
                ) -> Retrieval:
                    return retrieve(
                        case,
                        site.node_port if relay else site.direct_port,
                        NODE_AE if relay else PACS_AE,
                        uid,
                        out_dir=out_dir,
                        ours=ours,
                        agent_metrics=hospital.agent_metrics if relay else None,
                        timeout=_timeout(profile, raw_bytes, count),
                    )

                sample = quiet.measure(once)
                if sample.completed != count or sample.files != count:
                    raise BenchError(
                        f"{case}: {sample.completed} completed, {sample.files} files, "
                        f"expected {count}"
                    )
                raw_bytes = sample.file_bytes
                result.runs[case].append(sample)
                extra = f", {sample.compressed / MB:.1f} MB compressed" if relay else ""
                print(
                    f"  run {i + 1}/{runs} {case:6}: first {sample.first:6.2f} s, "
                    f"last {sample.last:6.2f} s{extra}, other load {sample.other_load:.2f} cores",
                    flush=True,
                )
        sizes = {r.file_bytes for rs in result.runs.values() for r in rs}
        if len(sizes) != 1:
            raise BenchError(f"relay and direct stored different amounts of data: {sizes}")
    return result


def _out_dir() -> Path:
    """Where getscu writes: tmpfs if there is one, so disk speed is not measured."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="relay-bench-wan-", dir=base))


def zstd_rate(level: int) -> tuple[float, float]:
    """(bytes/s per core, compressed/raw) of zstd at `level` on this workload's CT slices."""
    data = [inst.data for inst in make_study(ZSTD_SAMPLE, seed=1)]
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    started = time.process_time()
    packed = sum(len(compressor.compress(d)) for d in data)
    seconds = max(time.process_time() - started, 1e-9)
    raw = sum(map(len, data))
    return raw / seconds, packed / raw


def measure(
    workdir: Path,
    bench_pki: BenchPki,
    *,
    runs: int,
    count: int = DEFAULT_COUNT,
    profiles: Sequence[Profile] = (*PROFILES, LOOPBACK),
    knobs: Knobs | None = None,
    retry_budget: float = RETRY_BUDGET,
) -> tuple[list[ProfileResult], float, int]:
    """Every profile's runs, the time of an image-level C-FIND of the study, and how many
    retrievals were measured again."""
    knobs = knobs or Knobs()
    out_dir = _out_dir()
    results = []
    quiet = Quiet(retry_budget)
    try:
        with ProcessGroup(workdir) as group:
            hospital = start_hospital(group, bench_pki, workdir, count, knobs)
            find_seconds = image_find_seconds(hospital.pacs_port, study_uid(count))
            for profile in profiles:
                results.append(
                    run_profile(
                        bench_pki,
                        workdir,
                        hospital,
                        profile,
                        runs=runs,
                        count=count,
                        knobs=knobs,
                        out_dir=out_dir / "getscu",
                        quiet=quiet,
                    )
                )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return results, find_seconds, quiet.retried


def _verdicts(verdicts: Sequence[tuple[str, bool]]) -> str:
    return "; ".join(f"{name} {'✓' if ok else '✗ missed'}" for name, ok in verdicts)


def _s(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _ms(values: Sequence[float]) -> str:
    """Seconds as whole milliseconds: first instances differ by a few at 1 Gbit/s."""
    return ", ".join(f"{v * 1000:.0f}" for v in values)


_CPU_NAMES: Final = ("pacs", "agent", "gateway", "workstation", "getscu")


def _cpu_note(res: ProfileResult) -> str:
    """Median CPU seconds per retrieval of each process, relay and direct."""

    def line(case: str, names: Sequence[str]) -> str:
        values = [(n, res.cpu(case, n)) for n in names]
        proxies = res.cpu(case, "proxy-gateway") + res.cpu(case, "proxy-pacs")
        if res.profile.emulated:
            values.append(("proxy", proxies))
        total = sum(v for _, v in values)
        return f"{' + '.join(f'{n} {v:.1f}' for n, v in values)} = {total:.1f} s"

    return (
        f"CPU seconds per retrieval at {res.profile.label} (median): relay "
        f"{line('relay', _CPU_NAMES)}; direct {line('direct', ('pacs', 'getscu'))}."
    )


def _codec_note(res: ProfileResult) -> str:
    """Which transport codecs the agent used in each relay run, and their ratios."""
    runs = [r.codecs for r in res.runs["relay"] if r.codecs]
    if not runs:
        return ""

    def one(codecs: dict[str, Tally]) -> str:
        return ", ".join(
            f"{c} {t.instances} ({t.raw / t.wire:.2f}x)" for c, t in codecs.items() if t.wire
        )

    return (
        f"Transport codecs at {res.profile.label}, instances (ratio) per relay run "
        f"(`relay_pixel_codec_*`): {'; '.join(one(c) for c in runs)}."
    )


def _analysis(
    results: Sequence[ProfileResult], knobs: Knobs, zstd: tuple[float, float], find: float
) -> list[str]:
    notes = []
    floor = next((r for r in results if not r.profile.emulated), None)
    if floor is not None:
        relay_cpu = sum(floor.cpu("relay", n) for n in _CPU_NAMES)
        notes.append(
            f"CPU floor: on loopback with no proxy the relay needs "
            f"{floor.med('relay', 'last'):.2f} s to the last instance and direct "
            f"{floor.med('direct', 'last'):.2f} s; the relay case burns {relay_cpu:.1f} "
            f"CPU-seconds across its processes on {os.cpu_count()} cores "
            f"(≥ {relay_cpu / (os.cpu_count() or 1):.2f} s even if perfectly parallel). "
            f"First instance on loopback: relay {floor.med('relay', 'first'):.2f} s, "
            f"direct {floor.med('direct', 'first'):.2f} s; an image-level C-FIND of the study "
            f"(the last query of the agent's survey) takes {find:.2f} s against this PACS "
            "(findscu, best of 3)."
        )
    for res in results:
        if res.limit is None or res.profile.rate is None:
            continue
        model = (
            res.med("direct", "file_bytes") / res.profile.rate
            + len(res.runs["direct"][0].stored) * res.profile.rtt
        )
        bound = f" and its loopback floor {floor.med('relay', 'last'):.2f} s" if floor else ""
        count = len(res.runs["relay"][0].stored)
        pace = median([(r.last - r.first) / max(1, count - 1) for r in res.runs["relay"]])
        link_pace = res.compressed / count / res.profile.rate
        quietest = min(res.runs["relay"], key=lambda r: r.other_load)
        notes.append(
            f"{res.profile.label}: the relay took {res.med('relay', 'last'):.2f} s against a "
            f"physical limit of {res.limit:.2f} s{bound}: {res.med('relay', 'first'):.2f} s "
            f"to the first instance, then {pace * 1000:.1f} ms per instance where its "
            f"compressed bytes need {link_pace * 1000:.1f} ms at the nominal rate; its quietest "
            f"run ({quietest.other_load:.2f} cores of other load) took {quietest.last:.2f} s, "
            f"{quietest.last / res.limit:.2f}x the limit. Direct took "
            f"{res.med('direct', 'last'):.2f} s; raw bytes at the rate plus one round trip per "
            f"instance (its C-STORE sub-operations go one at a time) would be {model:.2f} s."
        )
    rate, ratio = zstd
    notes.append(
        f"zstd level {knobs.compression_level} on these CT slices, in this process: "
        f"{rate / MB:.0f} MB/s per core, output {ratio:.0%} of the input."
    )
    return notes


def section(
    results: Sequence[ProfileResult],
    *,
    runs: int,
    count: int,
    knobs: Knobs,
    zstd: tuple[float, float],
    find: float,
    retried: int,
) -> Section:
    table = [
        [
            "link (nominal)",
            "raw TCP through the proxy",
            "direct getscu: first / last (s)",
            "relay getscu: first / last (s)",
            "speed-up (direct / relay)",
            "compressed MB (of raw)",
            "physical limit (s)",
            "relay / limit",
            "targets",
            "issue 14 targets",
        ]
    ]
    for res in results:
        raw = res.med("relay", "file_bytes")
        check = res.check
        limit, to_limit = res.limit, res.to_limit
        verdicts = res.verdicts()
        table.append(
            [
                res.profile.label,
                f"{check.rate / MBIT:.1f} Mbit/s, {check.rtt * 1000:.1f} ms" if check else "—",
                f"{res.med('direct', 'first'):.3f} / {res.med('direct', 'last'):.2f}",
                f"{res.med('relay', 'first'):.3f} / {res.med('relay', 'last'):.2f}",
                f"**{res.speedup:.2f}x**",
                f"{res.compressed / MB:.1f} ({res.compressed / raw:.0%})",
                "—" if limit is None else f"{limit:.2f}",
                "—" if to_limit is None else f"**{to_limit:.2f}x**",
                _verdicts(verdicts) or "reference (CPU only)",
                _verdicts(res.codec_verdicts()) or "—",
            ]
        )
    raw_mb = results[0].med("relay", "file_bytes") / MB if results else 0.0
    real = knobs.study == "real-ct"
    pixels = (
        f"the pixels of one real CT slice in every instance (pydicom-data's {REAL_CT}, "
        "512x512, 14 bits signed: a scanner's correlated noise, which the phantom's white "
        "noise is not)"
        if real
        else "the synthetic phantom, 12-bit in 16"
    )
    notes = [
        f"Workload: one CT study of {count} instances, 512x512, {pixels}, Explicit VR "
        f"Little Endian, {raw_mb:.1f} MB as getscu stores it (files), held in memory by an "
        "embedded pynetdicom PACS in its own process. getscu (DCMTK, default options, `-S` "
        "study root, writing to tmpfs) retrieves it by C-GET at study level. TCP_NODELAY=1 "
        "for every process.",
        "direct: getscu → proxy → PACS, one DICOM association across the link. relay: getscu "
        "→ `relay workstation` (loopback) → proxy → `relay gateway` → `relay agent` → "
        "PACS (loopback); the workstation's link is up before getscu starts.",
        "Times run from getscu's launch to its log line 'Sending C-STORE Response' of the "
        "first and of the last instance (written once the file is complete). Speed-up = "
        "direct / relay, time to last instance.",
        f"Physical limit = compressed bytes / nominal rate + {HANDSHAKE_RTTS} RTT (TLS 1.3 + "
        "DICOM association). Compressed bytes: the agent's "
        '`relay_bytes_total{direction="sent",stage="compressed"}` over the retrieval '
        f"(zstd; {knobs.describe()}).",
        "The link is tests/bench/wanproxy.py, a userspace proxy (one-way delay RTT/2 and a "
        "token bucket per direction of each connection; this kernel has no netem). 'raw TCP "
        "through the proxy' is what it achieved just before, for a bulk transfer of about "
        "2 s at the nominal rate and a one-byte ping; at 1 Gbit/s the proxy is CPU-bound and "
        "reaches the nominal rate only when the machine is quiet. Its TCP connections are "
        "on loopback, so TCP's own slow start and receive windows over a long path are not "
        "emulated, which if anything flatters direct DICOM.",
        f"{runs} runs per case, relay and direct alternating, same processes; median "
        f"reported. MB = 10^6 bytes. {os.cpu_count()} cores shared by PACS, agent, gateway, "
        "workstation, proxies and getscu, and with other work on this machine ('other load': "
        "cores used by processes outside the benchmark during each run). Before each "
        f"retrieval the benchmark waits up to {WAIT_QUIET:g} s for other load under {QUIET} "
        f"cores; a retrieval of under {SHORT:g} s that saw more is measured again, up to "
        f"{TRIES} times, keeping the quietest, while a {RETRY_BUDGET:g} s budget lasts "
        f"({retried} re-measured in this run). A busy machine slows the relay (several "
        "processes, all CPU-bound at times) far more than direct DICOM (one PACS process "
        "waiting on round trips).",
    ]
    for res in results:
        notes.append(
            f"{res.profile.label}, per run: direct first "
            f"{_ms([r.first for r in res.runs['direct']])} ms, last "
            f"{_s([r.last for r in res.runs['direct']])} s; relay first "
            f"{_ms([r.first for r in res.runs['relay']])} ms, last "
            f"{_s([r.last for r in res.runs['relay']])} s; other load direct "
            f"{_s([r.other_load for r in res.runs['direct']])}, relay "
            f"{_s([r.other_load for r in res.runs['relay']])} cores; the agent's C-GET "
            f"took the spare association the previous retrieval left in "
            f"{sum(r.spare for r in res.runs['relay'])} of {len(res.runs['relay'])} relay "
            f"runs (it waits {PacsTarget.spare_association:g} s, and the relay runs are "
            "apart by a direct one; a cold C-GET associates with the PACS first)."
        )
    notes += [_cpu_note(res) for res in results]
    notes += [n for res in results if (n := _codec_note(res))]
    notes += _analysis(results, knobs, zstd, find)
    if real:
        return Section(
            "wan-real-ct",
            "The same retrieval with a real CT slice's pixels (issue 14)",
            machine_line(),
            table,
            notes,
        )
    notes += FINDINGS
    return Section(
        "wan",
        "DICOM retrieval across an emulated WAN: relay vs direct getscu (issue 3)",
        machine_line(),
        table,
        notes,
    )


def run(
    workdir: Path,
    bench_pki: BenchPki,
    *,
    runs: int = 3,
    count: int = DEFAULT_COUNT,
    profiles: Sequence[Profile] = (*PROFILES, LOOPBACK),
    knobs: Knobs | None = None,
) -> Section:
    """The whole benchmark as the docs/BENCHMARKS.md section `bench:wan`."""
    knobs = knobs or Knobs()
    results, find, retried = measure(
        workdir, bench_pki, runs=runs, count=count, profiles=profiles, knobs=knobs
    )
    out = section(
        results,
        runs=runs,
        count=count,
        knobs=knobs,
        zstd=zstd_rate(knobs.compression_level),
        find=find,
        retried=retried,
    )
    if gateway_needs_shim(bench_pki):
        out.notes.append(SHIM_NOTE)
    return out


def main(argv: list[str] | None = None) -> int:
    """Try knobs without touching the doc (prints the section; `--write` writes it)."""
    every = (*PROFILES, LOOPBACK)
    names = [p.name for p in every]
    parser = argparse.ArgumentParser(prog="python -m tests.bench.wan", description=__doc__)
    parser.add_argument("--profiles", default=",".join(names), help=f"of {', '.join(names)}")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--limits", default="", help="YAML flow mapping for limits:")
    parser.add_argument("--compression-level", type=int, default=3)
    parser.add_argument("--pixel-codecs", default="auto", help="auto, off, jpegls, htj2k or jpegxl")
    parser.add_argument(
        "--spare-association", default="", help="pacs.spare_association, e.g. 0s (none)"
    )
    parser.add_argument("--study", choices=STUDIES, default="phantom", help="the CT's pixels")
    parser.add_argument("--write", action="store_true", help=f"write the section into {DOC}")
    args = parser.parse_args(argv)
    chosen = [p for p in every if p.name in args.profiles.split(",")]
    if not chosen:
        parser.error(f"no profile among {args.profiles!r}")
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    knobs = Knobs(
        args.limits, args.compression_level, args.pixel_codecs, args.study, args.spare_association
    )
    try:
        out = run(
            workdir, make_pki(workdir / "pki"), runs=args.runs, count=args.count,
            profiles=chosen, knobs=knobs,
        )  # fmt: skip
    except BenchError as exc:
        print(f"wan FAILED: {exc}\nprocess logs kept in {workdir}", file=sys.stderr)
        return 1
    print(out.render())
    if args.write:
        write_section(out)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
