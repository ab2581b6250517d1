"""What the viewer benchmark reads from the page: when the first image was on screen and
when the last of the series' frames had arrived, in the page's own clock (ms since the
navigation started, `performance.now()`).

The probe is injected before any of the page's scripts run (DevTools
`Page.addScriptToEvaluateOnNewDocument`): it enlarges the resource-timing buffer (the
default 250 entries would drop frames) and samples the largest visible canvas every
50 ms, shrunk to 64x64, recording the first moment it shows an image (>= 32 grey levels
over a range of >= 64; a spinner or a black viewport has neither).
"""

from __future__ import annotations

from typing import Any, Final

PROBE_JS: Final = """
(() => {
  performance.setResourceTimingBufferSize(100000);
  window.__relayFirstImage = null;
  const small = document.createElement('canvas');
  small.width = 64; small.height = 64;
  const check = () => {
    if (window.__relayFirstImage !== null) return;
    const canvases = [...document.querySelectorAll('canvas')]
      .filter(c => c.width > 64 && c.height > 64 && c.offsetParent !== null);
    if (!canvases.length) return;
    const c = canvases.reduce((a, b) => (a.width * a.height >= b.width * b.height ? a : b));
    const ctx = small.getContext('2d', {willReadFrequently: true});
    ctx.clearRect(0, 0, 64, 64);
    try { ctx.drawImage(c, 0, 0, 64, 64); } catch (e) { return; }
    const d = ctx.getImageData(0, 0, 64, 64).data;
    const seen = new Set(); let lo = 255, hi = 0;
    for (let i = 0; i < d.length; i += 4) {
      const v = (d[i] + d[i + 1] + d[i + 2]) / 3 | 0;
      seen.add(v); if (v < lo) lo = v; if (v > hi) hi = v;
    }
    if (seen.size >= 32 && hi - lo >= 64) window.__relayFirstImage = performance.now();
  };
  setInterval(check, 50);
})();
"""

STATE_JS: Final = """
const frames = performance.getEntriesByType('resource')
  .filter(e => /\\/instances\\/[^/]+\\/frames\\//.test(e.name));
const done = new Map();
for (const e of frames) {
  const uid = e.name.match(/\\/instances\\/([^/]+)\\/frames\\//)[1];
  if (e.responseEnd > 0) done.set(uid, Math.max(done.get(uid) || 0, e.responseEnd));
}
const dw = performance.getEntriesByType('resource').filter(e => e.name.includes('/dicom-web'));
const meta = dw.filter(e => /\\/series\\/[^/]+\\/metadata/.test(e.name) && e.responseEnd > 0);
return {first: window.__relayFirstImage, frames: done.size,
        dicomweb_start: dw.length ? Math.min(...dw.map(e => e.startTime)) : null,
        last: done.size ? Math.max(...done.values()) : null,
        bytes: frames.reduce((s, e) => s + (e.encodedBodySize || 0), 0),
        metadata_end: meta.length ? Math.min(...meta.map(e => e.responseEnd)) : null,
        first_frame_asked: frames.length ? Math.min(...frames.map(e => e.startTime)) : null,
        now: performance.now()};
"""


def install_probe(driver: Any) -> None:
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PROBE_JS})


def page_state(driver: Any) -> dict[str, Any]:
    state: dict[str, Any] = driver.execute_script(STATE_JS)
    return state
