"""The agent's handlers for non-TCP stream targets: `dicom` against the PACS, audited;
and the readiness check of that PACS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

from relay.agent.audit import AuditLog
from relay.agent.config import AgentConfig
from relay.agent.dispatch import TargetHandler, admit_request
from relay.agent.pacs_check import ECHO_TIMEOUT, PacsCheck
from relay.net.aio import Stream
from relay.ops.binding import listen_errors
from relay.ops.metrics import EndMetrics
from relay.seal.transport import sealed_peer
from relay.wire import TARGET_DICOM

if TYPE_CHECKING:  # the DICOM package loads only with `pacs:` (below)
    from prometheus_client.registry import Collector

    from relay.agent.dicom_audit import DicomAuditor
    from relay.dicom.agent import OperationSummary

__all__ = ["default_handlers", "pacs_check", "serve_audited"]

log = logging.getLogger(__name__)


class _Serves(Protocol):
    async def serve(
        self,
        stream: Stream,
        *,
        on_request: Callable[[OperationSummary], None] | None = None,
        admit: Callable[[], bool] | None = None,
        device: str = "",
    ) -> OperationSummary: ...


async def serve_audited(
    dicom: _Serves, stream: Stream, auditor: DicomAuditor | None, device: str
) -> OperationSummary:
    """Serve one DICOM stream, audited: its begin when the request is read, its end when
    it ends, also when it is cut (the drain cancels it, or it raises): the trail then
    says the transfer ended in failure rather than leaving its begin without an end."""
    begun: list[OperationSummary] = []

    def begin(summary: OperationSummary) -> None:
        begun.append(summary)
        if auditor is not None:
            auditor.begin(device, summary)

    try:
        # The site's operation slot is taken once the request is read (dispatch.py).
        summary = await dicom.serve(stream, on_request=begin, admit=admit_request, device=device)
    except BaseException as exc:
        if auditor is not None and begun:
            from relay.dicom.status import LINK_LOST  # only ever with `pacs:` (loaded)

            why = "the agent stopped" if isinstance(exc, asyncio.CancelledError) else "failed"
            comment = f"cut: {why} ({type(exc).__name__})"
            auditor.end(device, dataclasses.replace(begun[0], status=LINK_LOST, comment=comment))
        raise
    if auditor is not None:
        auditor.end(device, summary)
    return summary


def pacs_check(config: AgentConfig) -> PacsCheck | None:
    """The C-ECHO check of the configured PACS for /readyz, or None without `pacs:`."""
    if config.pacs is None:
        return None
    pacs = config.pacs

    def echo() -> tuple[bool, str]:
        # Imported here, not at the top: an agent without `pacs:` never loads pynetdicom.
        from relay.dicom.pacs_echo import echo_pacs

        return echo_pacs(pacs, ECHO_TIMEOUT)

    return PacsCheck(echo)


@contextlib.asynccontextmanager
async def default_handlers(
    config: AgentConfig,
    metrics: EndMetrics | None = None,
    audit: AuditLog | None = None,
) -> AsyncIterator[dict[str, TargetHandler]]:
    """The handlers of non-TCP targets: `dicom` when a PACS is configured and the DICOM
    package is available. Owns their lifetime (e.g. the C-MOVE storage SCP)."""
    handlers: dict[str, TargetHandler] = {}
    if config.pacs is None:
        yield handlers
        return
    # Imported here, not at the top: an agent without `pacs:` never loads pynetdicom.
    from relay.agent import pacs_memory
    from relay.agent.codec_metrics import PixelCodecMetrics
    from relay.agent.dicom_audit import DicomAuditor
    from relay.agent.move_metrics import MoveReceiverMetrics
    from relay.agent.spare_metrics import SpareAssociationMetrics
    from relay.dicom.agent import DicomAgent

    target = dataclasses.replace(config.pacs, compression_level=config.compression_level)
    dicom = DicomAgent(target, stats=metrics.dicom if metrics is not None else None)
    # Loaded before the first request, saved after the last (dicom.stop() included).
    async with pacs_memory.kept(config.state_dir, target, dicom.memory):
        # binds the C-MOVE receiver (retrieve: move): a taken port is the key to fix
        with listen_errors(config.path, "pacs.move_listen", target.move_listen):
            await dicom.start()
        collectors: list[Collector] = [
            PixelCodecMetrics(dicom.rates.tallies),
            SpareAssociationMetrics(dicom.spare.counts),
        ]
        if dicom.move_receiver is not None:
            collectors.append(MoveReceiverMetrics(dicom.move_receiver.counts))
        registry = metrics.registry if metrics is not None else None
        if registry is not None:
            for collector in collectors:
                registry.register(collector)

        auditor = DicomAuditor(audit) if audit is not None else None

        async def serve_dicom(stream: Stream) -> None:
            peer = sealed_peer(stream)  # the inner certificate's identity
            device = peer.uri if peer is not None else ""
            summary = await serve_audited(dicom, stream, auditor, device)
            log.info(
                "dicom operation",
                extra={
                    "stream": stream.stream_id,
                    "device": device,
                    "op": summary.op,
                    "status": summary.status,
                    "instances": summary.instances,
                    "seconds": round(summary.seconds, 3),
                },
            )

        handlers[TARGET_DICOM] = serve_dicom
        try:
            yield handlers
        finally:
            if registry is not None:
                for collector in collectors:
                    registry.unregister(collector)
            await dicom.stop()
