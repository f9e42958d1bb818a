"""Spooling output: line counts, whatever the shape of the text."""

from __future__ import annotations

import os

import pytest

from fleetrun.core.output import SpoolWriter, count_lines

MiB = 1 << 20

SHAPES = {
    "empty": b"",
    "no newline": b"x" * MiB,
    "only newlines": b"\n" * MiB,
    "8-byte lines": b"1234567\n" * (MiB // 8),
    "64-byte lines": (b"x" * 63 + b"\n") * (MiB // 64),
    "1 KiB lines, no final newline": (b"y" * 1023 + b"\n") * 1023 + b"tail",
    "random bytes": os.urandom(MiB),
    # The sample at the start says long lines; the rest is nothing but newlines.
    "long lines, then only newlines": (b"z" * 4095 + b"\n") * 4 + b"\n" * MiB,
    "short chunk": b"a\nb\n\nc",
}


@pytest.mark.parametrize("shape", SHAPES)
def test_count_lines_counts_every_newline(shape):
    data = SHAPES[shape]
    assert count_lines(data) == data.count(b"\n")


def test_the_spool_counts_lines_across_chunks_and_past_the_limit(tmp_path):
    spool = SpoolWriter(tmp_path, "stdout", limit=100)
    chunks = [SHAPES["64-byte lines"], b"partial line", b" ends here\n", SHAPES["8-byte lines"]]
    for chunk in chunks:
        spool.write(chunk)
    spool.close()
    assert spool.lines == sum(chunk.count(b"\n") for chunk in chunks)
    assert spool.bytes_seen == sum(map(len, chunks))
    assert spool.bytes_kept == 100 and spool.truncated
    assert (tmp_path / "stdout").read_bytes() == SHAPES["64-byte lines"][:100]


def test_a_full_disk_truncates_the_spool_and_loses_no_count(tmp_path, caplog):
    directory = tmp_path / "task"
    directory.mkdir()
    (directory / "stdout").symlink_to("/dev/full")  # every write fails with ENOSPC
    spool = SpoolWriter(directory, "stdout", 1 << 30)
    spool.write(b"one\ntwo\n")
    spool.write(b"three\n")
    spool.close()
    assert (spool.bytes_seen, spool.bytes_kept, spool.lines, spool.truncated) == (14, 0, 3, True)
    assert caplog.text.count("keeping no more stdout") == 1
    assert "No space left on device" in caplog.text
