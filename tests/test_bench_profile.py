"""The profiler's summary of py-spy's collapsed stacks: own and inclusive shares."""

from __future__ import annotations

from pathlib import Path

from tests.bench.profile import summarize


def test_summary_counts_own_time_at_the_leaf_and_inclusive_time_once_per_stack(
    tmp_path: Path,
) -> None:
    collapsed = tmp_path / "agent.collapsed"
    run, enc = "run (relay/cli.py:10)", "encode (codecs/pixels.py:{})"
    collapsed.write_text(
        f"{run};{enc.format(300)};_decode_frame (codecs/pixels.py:386) 3\n"
        f"{run};{enc.format(301)};_encode_frame (codecs/pixels.py:376) 1\n"
        f"{run};run (relay/cli.py:12) 4\n"  # recursion: counted once in inclusive time
    )
    text = summarize(collapsed)
    own, inclusive = text.split("inclusive time:")
    assert text.startswith("8 samples")
    assert "37.5%  _decode_frame (codecs/pixels.py)" in own
    assert "12.5%  _encode_frame (codecs/pixels.py)" in own
    assert "50.0%  run (relay/cli.py)" in own
    assert "100.0%  run (relay/cli.py)" in inclusive
    assert "50.0%  encode (codecs/pixels.py)" in inclusive  # lines 300 and 301 merged
