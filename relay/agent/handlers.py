"""The agent's handlers for non-TCP stream targets: `dicom` against the PACS, audited;
and the readiness check of that PACS."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator

from relay.agent.audit import AuditLog
from relay.agent.config import AgentConfig
from relay.agent.dispatch import TargetHandler
from relay.agent.pacs_check import ECHO_TIMEOUT, PacsCheck
from relay.net.aio import Stream
from relay.ops.metrics import EndMetrics
from relay.seal.transport import sealed_peer
from relay.wire import TARGET_DICOM

__all__ = ["default_handlers", "pacs_check"]

log = logging.getLogger(__name__)


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
    from relay.agent.spare_metrics import SpareAssociationMetrics
    from relay.dicom.agent import DicomAgent

    target = dataclasses.replace(config.pacs, compression_level=config.compression_level)
    dicom = DicomAgent(target, stats=metrics.dicom if metrics is not None else None)
    # Loaded before the first request, saved after the last (dicom.stop() included).
    async with pacs_memory.kept(config.state_dir, target, dicom.memory):
        await dicom.start()
        collectors = (
            PixelCodecMetrics(dicom.rates.tallies),
            SpareAssociationMetrics(dicom.spare.counts),
        )
        registry = metrics.registry if metrics is not None else None
        if registry is not None:
            for collector in collectors:
                registry.register(collector)

        auditor = DicomAuditor(audit) if audit is not None else None

        async def serve_dicom(stream: Stream) -> None:
            peer = sealed_peer(stream)  # the inner certificate's identity
            device = peer.uri if peer is not None else ""
            begin = (lambda s: auditor.begin(device, s)) if auditor is not None else None
            summary = await dicom.serve(stream, on_request=begin)
            if auditor is not None:
                auditor.end(device, summary)
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
