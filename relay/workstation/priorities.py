"""Which of the workstation's streams go first on the link: the one place that says so.

A viewer's own request (the DICOM node's C-GET/C-MOVE/C-FIND, a browser viewer's
DICOMweb retrieval) goes at the default urgency; prefetch takes what is left of the link
at a background urgency (relay/PROTOCOL.md, "Priorities"). The agent sends each stream's
study data at the urgency the workstation opened it with.
"""

from __future__ import annotations

from typing import Final

from relay.proto import DEFAULT_PRIORITY, Priority

VIEWER: Final = DEFAULT_PRIORITY
"""A viewer's own request: u=3 (the default, also what streams without the header get)."""
VIEWPORT_NEXT: Final = Priority(urgency=2)
"""The one instance a browser viewer's viewport waits for while its series is still on the
way (relay.workstation.dicomweb.retrieve: jump ahead): u=2, before the series' own
stream at u=3, which carries on behind it."""
PREFETCH: Final = Priority(urgency=6)
"""Prefetch and its priors: u=6, background; incremental, so studies fill side by side."""
VIEWER_WINDOW: Final = 3 * 1024 * 1024
"""Extra receive window of the DICOM streams the workstation opens at VIEWER's urgency or
above (relay.workstation.session, its inner Link), on top of `limits.stream_window`.
Below the agent's inner core wait its seal queue and one outer session window per hop
(1 MiB each by default): with prefetch filling those, a viewer's stream limited to 1 MiB
in flight got about 40 % of the link (docs/BENCHMARKS.md); with 4 MiB it has more in
flight than they hold, so the agent always has its data to send first.

It is the stream's own, not the session's: a viewer that stops reading leaves up to 4 MiB
unread, but it holds link credit for only 1 MiB of it (relay.proto.Connection.grow_window),
so stalled viewers cannot take the session's link window (16 MiB) from the others."""
VIEWER_WINDOW_STREAMS: Final = 8
"""At most this many streams hold VIEWER_WINDOW at once (a stream holds it until it can
no longer have more than its base window unread); later ones get the base window until
one is done. So a session buffers at most `limits.link_window` + 8 x 3 MiB of unread data;
8 is as many associations as the DICOM node takes at once (relay.dicom.node's default)."""
