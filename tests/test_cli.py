"""`relay` from a real process: user errors are one line and status 2; bugs keep their traceback.

The internal errors are injected into a real `relay` process by replacing one function
before `relay.cli.main` runs, as an OSError or ValueError from deep inside would arrive.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ops.config import Address
from relay.trust.codes import EnrollmentCode, new_secret, new_token_id
from tests.pki_helpers import make_pki

ROOT = Path(__file__).resolve().parents[1]
RELAY = [sys.executable, "-m", "relay.cli"]
HOST = "127.0.0.1"


def relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RELAY, *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )


def assert_user_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port held listening by this test for its whole duration."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port: int = s.getsockname()[1]
        yield port


@pytest.mark.parametrize(
    "args",
    [
        ("pki", "issue", "--dir", "x", "--site", "s", "--device", "d", "--out", "o",
         "--lifetime", "3 fortnights"),
        ("token", "create", "--config", "x.yaml", "--device", "d", "--ttl=-1h"),
    ],
)  # fmt: skip
def test_bad_duration_is_argparse_usage_error(args: tuple[str, ...]) -> None:
    done = relay(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "usage: relay" in done.stderr
    assert "expected a duration" in done.stderr


@pytest.mark.parametrize(
    ("option", "value", "limit"),
    [
        ("--lifetime", "0s", "at most 366d"),
        ("--lifetime", "400d", "at most 366d"),
        ("--lifetime", "1e300d", "is too long"),  # OverflowError: a traceback, exit 1
        ("--ttl", "31d", "at most 30d"),
        ("--ttl", "99999999999d", "is too long"),
    ],
)
def test_a_duration_out_of_bounds_is_a_usage_error(option: str, value: str, limit: str) -> None:
    args: tuple[str, ...]
    if option == "--ttl":
        args = ("token", "create", "--config", "x.yaml", "--device", "d", f"--ttl={value}")
    else:
        args = ("pki", "issue", "--dir", "x", "--site", "s", "--device", "d", "--out", "o",
                f"--lifetime={value}")  # fmt: skip
    done = relay(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "usage: relay" in done.stderr and limit in done.stderr and value in done.stderr


def test_the_cli_bounds_a_code_ttl_as_the_agent_does() -> None:
    from relay.agent.registry import MAX_TTL
    from relay.cli import MAX_CODE_TTL

    assert MAX_CODE_TTL == MAX_TTL


def test_gateway_listen_port_taken_names_file_and_key(tmp_path: Path, taken_port: int) -> None:
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"listen: {HOST}:{taken_port}\n"
        f"tls: {{cert: {pki.gateway.cert}, key: {pki.gateway.key}, ca: {pki.ca}}}\n"
    )
    done = relay("gateway", "--config", str(config))
    assert_user_error(done, f"{config}: listen: cannot listen on {HOST}:{taken_port}")


def test_gateway_metrics_port_taken_names_file_and_key(tmp_path: Path, taken_port: int) -> None:
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"listen: {HOST}:0\n"
        f"metrics_listen: {HOST}:{taken_port}\n"
        f"tls: {{cert: {pki.gateway.cert}, key: {pki.gateway.key}, ca: {pki.ca}}}\n"
    )
    done = relay("gateway", "--config", str(config))
    assert_user_error(done, f"{config}: metrics_listen: cannot listen on")


def test_demo_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    done = relay("demo", "--dir", str(blocker / "demo"))
    assert_user_error(done, str(blocker / "demo"))


def _with_injected(target: str, error: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run `relay *argv` in a process where `target` (module:function) raises `error`."""
    module, function = target.split(":")
    script = textwrap.dedent(
        f"""
        import sys, importlib
        module = importlib.import_module({module!r})
        def broken(*args, **kwargs):
            raise {error}
        setattr(module, {function!r}, broken)
        from relay.cli import main
        sys.exit(main({list(argv)!r}))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "error", ["OSError(5, 'injected I/O fault')", "ValueError('injected bug')"]
)
def test_internal_error_shows_traceback_and_exits_1(tmp_path: Path, error: str) -> None:
    done = _with_injected(
        "relay.trust.pki:init_pki",
        error,
        "pki", "init", "--dir", str(tmp_path / "pki"), "--trust-domain", "h.test",
        "--site", "main", "--gateway-name", "localhost",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "injected" in done.stderr
    assert "in broken" in done.stderr  # the frame that raised is shown


def test_enroll_refuses_to_replace_an_identity_without_force(tmp_path: Path) -> None:
    """Refused before anything is dialled or spent; with --force it goes on (and here
    fails to reach the gateway, since nothing listens there)."""
    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind((HOST, 0))
        closed: int = s.getsockname()[1]
        code = EnrollmentCode(
            Address(HOST, closed), "ab" * 32, "main", "ws1", new_token_id(), new_secret()
        ).encode()
        identity = tmp_path / "identity"
        identity.mkdir()
        (identity / "device.crt").write_text("the certificate in use\n")
        done = relay("enroll", code, "--dir", str(identity))
        assert_user_error(done, "already holds an identity (device.crt)", "--force")
        assert (identity / "device.crt").read_text() == "the certificate in use\n"
        done = relay("enroll", code, "--dir", str(identity), "--force")
        assert_user_error(done, f"{HOST}:{closed}")
        assert "already holds" not in done.stderr


def test_workstation_dicom_port_taken_names_file_and_key(tmp_path: Path, taken_port: int) -> None:
    pki = make_pki(tmp_path / "pki")
    done = relay("pki", "issue", "--dir", str(pki.directory), "--site", "main",
                 "--device", "ws1", "--out", str(tmp_path / "identity"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = tmp_path / "workstation.yaml"
    config.write_text(
        f"gateway: {HOST}:1\n"
        "identity_dir: identity/\n"
        f"dicom: {{listen: '{HOST}:{taken_port}', ae_title: RELAY}}\n"
    )
    done = relay("workstation", "--config", str(config))
    assert_user_error(done, f"{config}: dicom.listen: cannot listen on {HOST}:{taken_port}")


def test_errors_of_modules_the_cli_does_not_import_are_still_user_errors() -> None:
    """RegistryError, EnrollError and DemoError are named, not imported, by relay.cli (so
    `relay gateway` loads no sealed sessions, SQLite or demo): each is still one line and
    exit 2, and a bug's ValueError still is not."""
    from relay.agent.registry import RegistryError
    from relay.cli import is_user_error
    from relay.trust.enroll import EnrollError
    from relay_dev.demo import DemoError

    for error in (RegistryError, EnrollError, DemoError):
        assert is_user_error(error("x"))
    assert not is_user_error(ValueError("x"))


def test_enroll_reads_the_code_and_password_on_stdin_as_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows: text-mode stdin decodes a pipe with the ANSI code page (cp1252), so a
    UTF-8 "Passwört1" arrived as "PasswÃ¶rt1": a wrong password that spends an attempt."""
    import io

    from relay import cli
    from relay.trust import enroll

    piped = "\ufeffDMZR-CODE\r\nPassw\u00f6rt1\r\n".encode("utf-16-le")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped), encoding="cp1252"))
    got: dict[str, str] = {}

    def run_enroll(code: str, out_dir: Path, **kwargs: object) -> int:
        got["code"] = code
        got["password"] = enroll.read_password("alice", stdin=kwargs["password_stdin"])  # type: ignore[arg-type]
        return 0

    monkeypatch.setattr(enroll, "run_enroll", run_enroll)
    assert cli.main(["enroll", "-", "--dir", str(tmp_path), "--password-stdin"]) == 0
    assert got == {"code": "DMZR-CODE", "password": "Passw\u00f6rt1"}


IT_PASSWORD = "Passw\u00f6rt-lang-genug"


@pytest.mark.parametrize(
    "piped",
    [
        ("\ufeff" + IT_PASSWORD + "\r\n").encode("utf-16-le"),  # PowerShell 5.1's pipe, `>`
        ("\ufeff" + IT_PASSWORD + "\r\n").encode("utf-16-be"),
        ("\ufeff" + IT_PASSWORD + "\r\n").encode("utf-8"),  # Notepad's "UTF-8 with BOM"
        (IT_PASSWORD + "\n").encode("utf-8"),
    ],
    ids=["utf-16-le", "utf-16-be", "utf-8-bom", "utf-8"],
)
def test_it_admin_passwd_reads_stdin_as_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piped: bytes
) -> None:
    """As `relay enroll` does: text-mode stdin decodes with the ANSI code page on Windows
    (cp1252 here), which turned the password into another one that IT could never type."""
    import io

    from relay import cli
    from relay.agent.itpages import passwords

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped), encoding="cp1252"))
    monkeypatch.setattr(passwords, "LOG2_N", 10)  # the real N=2^17 is 0.5-1 s a hash
    admins = tmp_path / "it-admins"
    argv = ["it-admin", "passwd", "--file", str(admins), "--user", "anna", "--password-stdin"]
    assert cli.main(argv) == 0
    assert passwords.verify_password(passwords.read_admins(admins)["anna"], IT_PASSWORD)


@pytest.mark.parametrize(
    ("piped", "why"),
    [
        (IT_PASSWORD.encode("cp1252") + b"\r\n", "is not UTF-8 or UTF-16 text"),  # ANSI
        (("\ufeff\ufeff" + IT_PASSWORD + "\n").encode(), "contains U+FEFF"),
        (b"a long\tenough password\n", "contains U+0009"),
    ],
    ids=["ansi", "two-boms", "tab"],
)
def test_it_admin_passwd_refuses_a_garbled_password_on_stdin(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    piped: bytes,
    why: str,
) -> None:
    import io

    from relay import cli

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped), encoding="cp1252"))
    admins = tmp_path / "it-admins"
    argv = ["it-admin", "passwd", "--file", str(admins), "--user", "anna", "--password-stdin"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("relay it-admin passwd: the password from stdin ") and why in err
    assert err.rstrip().endswith("nothing written")
    assert not admins.exists()


@pytest.mark.parametrize("where", ["a_directory", "missing/parent/log"])
def test_a_log_file_that_cannot_be_opened_is_one_line(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 2 and one line naming --log-file, not an IsADirectoryError's traceback."""
    from relay.cli import main

    log_file = tmp_path / where
    if where == "a_directory":
        log_file.mkdir()
    argv = ["workstation", "--config", str(tmp_path / "ws.yaml"), "--log-file", str(log_file)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"relay workstation: --log-file {log_file}: ")
    assert err.count("\n") == 1
