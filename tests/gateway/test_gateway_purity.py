"""The gateway stays opaque to payload: no DICOM, compression or sealed-session code (it
must not be able to open a session), no database, no file writes."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.pki_helpers import make_pki

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_MODULES = ("pydicom", "pynetdicom", "zstandard", "imagecodecs", "sqlite3", "relay_dev")
FORBIDDEN_PACKAGES = ("relay.dicom", "relay.codecs", "relay.net.compression", "relay.seal",
                      "relay.agent", "relay.workstation")  # fmt: skip
FORBIDDEN_CALLS = {"open", "write_text", "write_bytes", "mkdir", "touch", "unlink", "rename"}


def test_running_gateway_loads_no_dicom_or_compression_code(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from gateway.config import GatewayConfig
        from gateway.service import run_gateway
        from relay.ops.config import Address, TlsFiles
        import relay.cli  # the console script's module, as `relay gateway` loads it

        async def main():
            config = GatewayConfig(
                path=Path("x.yaml"), listen=Address("127.0.0.1", 0),
                metrics_listen=Address("127.0.0.1", 0),
                tls=TlsFiles(Path({str(pki.gateway.cert)!r}), Path({str(pki.gateway.key)!r}),
                             Path({str(pki.ca)!r})),
            )
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.3, stop.set)
            await run_gateway(config, stop=stop, handle_signals=False)

        asyncio.run(main())
        print("\\n".join(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "gateway.server" in loaded
    bad = sorted(
        m for m in loaded if m.split(".")[0] in FORBIDDEN_MODULES or m in FORBIDDEN_MODULES
    )
    bad += sorted(m for m in loaded if m.startswith(FORBIDDEN_PACKAGES))
    assert bad == []


def test_gateway_service_and_config_types_do_not_import_yaml() -> None:
    """The YAML parser stays out of the DMZ service: only the CLI's loader imports it."""
    script = textwrap.dedent(
        """
        import sys
        import gateway.service, gateway.config, gateway.lifecycle, relay.ops.config
        print("\\n".join(sorted(sys.modules)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "gateway.service" in loaded
    assert sorted(m for m in loaded if m == "yaml" or m.startswith("yaml.")) == []
    assert "relay.ops.configfile" not in loaded


def test_gateway_source_neither_imports_payload_code_nor_writes_files() -> None:
    for path in sorted((ROOT / "gateway").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for name in names:
                    forbidden = (*FORBIDDEN_MODULES, *FORBIDDEN_PACKAGES)
                    assert not name.startswith(forbidden), f"{path.name} imports {name}"
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                assert called not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {called}"
