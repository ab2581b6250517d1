"""Does every runtime dependency of dmz-relay have a wheel for the radiologist's PC?

`python -m relay_dev.wheelcheck` walks the runtime requirements of the installed
`dmz-relay` (no extras) and theirs, with the markers evaluated for each target (so
uvloop drops out on Windows), and asks the package index's JSON API whether the version
installed here (the one the tests ran with; the newest for a dependency not installed
here) has a wheel each target can install: win_amd64, macOS arm64 and macOS x86_64, for
CPython 3.11, 3.12 and 3.13. A source-only release would need a compiler on the PC:
that is a failure. Exit status 0 when every target is covered, 1 otherwise (the table
says what is missing), 2 when the index cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from packaging import tags
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

__all__ = ["TARGETS", "Target", "check", "main", "supports"]

INDEX = "https://pypi.org/pypi"
PYTHONS = ((3, 11), (3, 12), (3, 13))
TIMEOUT = 30.0
MAX_DEPENDENCIES = 200  # a closure larger than this is a mistake, not a dependency tree
MAX_JSON = 32 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """A platform and a CPython version that `pip install dmz-relay` must work on."""

    name: str
    python: tuple[int, int]
    platforms: tuple[str, ...]
    marker_env: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        return f"{self.name}/cp{self.python[0]}{self.python[1]}"

    @property
    def tags(self) -> frozenset[tags.Tag]:
        interpreter = f"cp{self.python[0]}{self.python[1]}"
        found = set(tags.cpython_tags(self.python, platforms=self.platforms))
        found |= set(tags.compatible_tags(self.python, interpreter, self.platforms))
        return frozenset(found)

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
        version = f"{self.python[0]}.{self.python[1]}"
        env.update(
            python_version=version,
            python_full_version=f"{version}.0",
            implementation_name="cpython",
            platform_python_implementation="CPython",
            extra="",
        )
        env.update(dict(self.marker_env))
        return env


def _target(name: str, python: tuple[int, int]) -> Target:
    if name == "win_amd64":
        return Target(
            name,
            python,
            ("win_amd64",),
            (
                ("sys_platform", "win32"),
                ("platform_system", "Windows"),
                ("os_name", "nt"),
                ("platform_machine", "AMD64"),
            ),
        )
    arch = name.removeprefix("macos_")
    oldest = (11, 0) if arch == "arm64" else (12, 0)  # what Apple still updates
    platforms = tuple(tags.mac_platforms(oldest, arch))
    machine = (("platform_machine", arch),)
    mac = (("sys_platform", "darwin"), ("platform_system", "Darwin"), ("os_name", "posix"))
    return Target(name, python, platforms, mac + machine)


TARGETS = tuple(
    _target(name, python)
    for name in ("win_amd64", "macos_arm64", "macos_x86_64")
    for python in PYTHONS
)


def supports(filenames: Iterable[str], target: Target) -> bool:
    """Whether one of these release files is a wheel that `target` can install."""
    wanted = target.tags
    for filename in filenames:
        if not filename.endswith(".whl"):
            continue
        try:
            _, _, _, file_tags = parse_wheel_filename(filename)
        except ValueError:
            continue
        if file_tags & wanted:
            return True
    return False


Fetch = Callable[[str], dict[str, object]]


def fetch_json(url: str) -> dict[str, object]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        data = json.loads(response.read(MAX_JSON))
    if not isinstance(data, dict):
        raise ValueError(f"{url}: not a JSON object")
    return data


@dataclass(frozen=True)
class Project:
    """What the index says of one project, and which release of it we test with."""

    name: str
    version: str  # installed here, else the newest
    files: dict[str, tuple[str, ...]]  # version -> its files that are not yanked
    requires: tuple[str, ...]  # of `version`


def _installed(name: str) -> tuple[str, list[str]] | None:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist.version, list(dist.requires or [])


def project_of(name: str, fetch: Fetch) -> Project:
    """One request per project (`/pypi/NAME/json` lists every release's files)."""
    data = fetch(f"{INDEX}/{name}/json")
    info, releases = data.get("info"), data.get("releases")
    if not isinstance(info, dict) or not isinstance(releases, dict):
        raise ValueError(f"{INDEX}/{name}/json: no info or releases")
    installed = _installed(name)
    if installed is not None:
        version, requires = installed
    else:
        version = str(info["version"])
        requires = list(info.get("requires_dist") or [])
    files = {
        str(v): tuple(str(f["filename"]) for f in fs if isinstance(f, dict) and not f.get("yanked"))
        for v, fs in releases.items()
        if isinstance(fs, list)
    }
    return Project(canonicalize_name(name), version, files, tuple(requires))


def _wanted(requirements: Iterable[str], env: dict[str, str]) -> list[Requirement]:
    wanted = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(env):
            wanted.append(requirement)
    return wanted


def newest_with_wheel(project: Project, specifier: SpecifierSet, target: Target) -> str | None:
    """The newest final release allowed by `specifier` that `target` installs as a wheel."""
    versions = []
    for text in project.files:
        with contextlib.suppress(InvalidVersion):
            version = Version(text)
            if not version.is_prerelease and version in specifier:
                versions.append(version)
    for version in sorted(versions, reverse=True):
        if supports(project.files[str(version)], target):
            return str(version)
    return None


@dataclass(frozen=True)
class Finding:
    """`target` cannot install `project==version` as a wheel; `fallback` is the newest
    allowed release it can (pip --prefer-binary picks it), None if there is none."""

    target: Target
    fallback: str | None


def check(
    root: str = "dmz-relay", targets: Sequence[Target] = TARGETS, fetch: Fetch = fetch_json
) -> dict[str, list[Finding]]:
    """`name==version` of every runtime dependency of `root` -> what its wheels lack."""
    project = cache(lambda name: project_of(name, fetch))
    root_installed = _installed(root)
    if root_installed is None:
        raise SystemExit(f"{root} is not installed here (pip install -e . first)")
    found: dict[str, list[Finding]] = {}
    for target in targets:
        env = target.environment()
        todo = _wanted(root_installed[1], env)
        seen: set[str] = set()
        while todo:
            requirement = todo.pop()
            name = canonicalize_name(requirement.name)
            if name in seen:
                continue
            seen.add(name)
            if len(seen) > MAX_DEPENDENCIES:
                raise SystemExit(f"more than {MAX_DEPENDENCIES} dependencies: giving up")
            dep = project(name)
            key = f"{dep.name}=={dep.version}"
            found.setdefault(key, [])
            if not supports(dep.files.get(dep.version, ()), target):
                fallback = newest_with_wheel(dep, requirement.specifier, target)
                found[key].append(Finding(target, fallback))
            todo += _wanted(dep.requires, env)
    return found


def _report(key: str, findings: Sequence[Finding]) -> str:
    if not findings:
        return "ok"
    by_fallback: dict[str | None, list[str]] = {}
    for finding in findings:
        by_fallback.setdefault(finding.fallback, []).append(str(finding.target))
    parts = []
    for fallback, where in by_fallback.items():
        if fallback is None:
            parts.append(f"MISSING for {', '.join(where)}")
        else:
            parts.append(f"only {fallback} has a wheel for {', '.join(where)} (--prefer-binary)")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay_dev.wheelcheck", description=__doc__)
    parser.add_argument("--package", default="dmz-relay", help="whose dependencies to check")
    args = parser.parse_args(argv)
    try:
        result = check(args.package)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        print(f"wheelcheck: cannot reach {INDEX}: {exc}", file=sys.stderr)
        return 2
    width = max(map(len, result), default=0)
    for key in sorted(result):
        print(f"{key:<{width}}  {_report(key, result[key])}")
    missing = [k for k, fs in result.items() if any(f.fallback is None for f in fs)]
    older = [k for k, fs in result.items() if fs and k not in missing]
    targets = ", ".join(str(t) for t in TARGETS)
    if missing:
        print(f"{len(missing)} of {len(result)} dependencies have no wheel for a target")
        return 1
    print(f"all {len(result)} dependencies have wheels for {targets}", end="")
    print(f" ({len(older)} only in an older release: pip install --prefer-binary)" if older else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
