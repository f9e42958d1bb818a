"""Spooling output: line counts, whatever the shape of the text; pieces read back as text."""

from __future__ import annotations

import os
import secrets

import pytest

from fleetrun.core.output import OutputSlice, SpoolWriter, as_text, count_lines
from fleetrun.core.secrets import register_secret

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


# -- pieces decoded as text: never a character cut in two -------------------------------------

TEXT = "naïve € 😀 done\n"
ENCODED = TEXT.encode()


def _piece(offset: int, max_bytes: int, *, written: bytes = ENCODED, ended: bool = True) -> OutputSlice:
    data = written[offset : offset + max_bytes]
    next_offset = offset + len(data)
    return OutputSlice("stdout", offset, next_offset, data, len(written), complete=ended and next_offset >= len(written), ended=ended)


@pytest.mark.parametrize("ended", [True, False], ids=["ended", "running"])
@pytest.mark.parametrize("max_bytes", range(4, 10))
def test_reading_on_from_next_offset_decodes_every_character_whole(max_bytes, ended):
    offset, texts = 0, []
    while offset < len(ENCODED):
        piece = _piece(offset, max_bytes, ended=ended).whole_characters()
        assert piece.next_offset > offset  # every read gets on
        texts.append(piece.text)
        offset = piece.next_offset
    assert texts and "".join(texts) == TEXT
    assert all("\ufffd" not in text for text in texts)


def test_a_piece_shorter_than_its_character_keeps_its_bytes():
    # max_bytes 1 on "€": emptied, the piece would send its reader back to the same offset forever.
    piece = _piece(ENCODED.index("€".encode()), 1).whole_characters()
    assert (piece.data, piece.next_offset - piece.offset) == (b"\xe2", 1)


def test_at_the_end_of_a_running_task_a_half_written_character_waits_for_the_next_read():
    written = "€".encode()[:2]
    piece = _piece(0, 64, written=written, ended=False).whole_characters()
    assert (piece.data, piece.offset, piece.next_offset) == (b"", 0, 0)
    # Once the task has ended, those bytes are all there will ever be: they are shown.
    ended = _piece(0, 64, written=written, ended=True).whole_characters()
    assert ended.data == written and ended.text == "\ufffd"


def test_a_tail_starts_on_a_whole_character_and_says_where():
    start = ENCODED.index("€".encode()) + 1  # inside the euro sign
    piece = _piece(start, 64).whole_characters(align_start=True)
    assert (piece.text, piece.offset) == (" 😀 done\n", start + 2)
    # Read from a given offset, the bytes stay: the reader chose where to start.
    assert _piece(start, 64).whole_characters().data == ENCODED[start:]


def test_bytes_that_are_not_utf8_are_left_as_they_are():
    binary = b"\x00\xff\xfe\x80\x80\x80\x80abc\xc0"
    for max_bytes in range(1, len(binary) + 1):
        assert _piece(0, max_bytes, written=binary, ended=False).whole_characters().data == binary[:max_bytes]


# -- pieces read as text: no secret, whole or in part --------------------------------------------

SECRET = "S3CR3T-" + secrets.token_hex(6).upper()
register_secret(SECRET)


def _read_as_text(written: bytes, max_bytes: int, *, ended: bool) -> tuple[list[str], int]:
    offset, texts = 0, []
    while True:
        piece, text = as_text(_piece(offset, max_bytes, written=written, ended=ended), lambda at, size: written[at : at + size])
        texts.append(text)
        if piece.next_offset == offset or piece.complete:
            return texts, piece.next_offset
        offset = piece.next_offset


@pytest.mark.parametrize("max_bytes", [1, 2, 5, 64])
def test_a_secret_read_in_pieces_shows_as_stars_in_every_piece(max_bytes):
    written = f"before {SECRET} after\n".encode()
    for ended in (True, False):
        texts, end = _read_as_text(written, max_bytes, ended=ended)
        assert end == len(written)
        assert "".join(texts).replace("***", "") == "before  after\n"
        assert all(text == "***" or not set(SECRET) & set(text) for text in texts)


@pytest.mark.parametrize("max_bytes", [1, 3, 64])
def test_the_beginning_of_a_secret_waits_for_its_rest_while_the_task_runs(max_bytes):
    written = f"x {SECRET[:5]}".encode()
    texts, end = _read_as_text(written, max_bytes, ended=False)
    assert ("".join(texts), end) == ("x ", 2)
    # Once the task has ended nothing can follow: those bytes are not a secret, and every read gets on.
    texts, end = _read_as_text(written, max_bytes, ended=True)
    assert ("".join(texts), end) == (written.decode(), len(written))
