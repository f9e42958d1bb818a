"""Secrets: read from where the hosts file points, and kept out of everything written.

A secret (an SSH password, an identity file's passphrase) never sits in the hosts file:
a host names an environment variable or a file that holds it. Every value read through
:func:`read_secret` is remembered for this process, and :func:`redact` replaces it with
``***`` wherever fleetrun writes text: task records, errors, the JSON log, notifications,
log lines (through :class:`RedactingFilter`) and the CLI's own messages. The environment
variables secrets are read from are remembered too (:func:`secret_variables`): a command
run on this machine does not inherit them.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from typing import Mapping

from fleetrun.core import paths

REDACTED = "***"
#: Shorter values would blank out ordinary text; they are refused as secrets.
MIN_SECRET_LENGTH = 4

log = logging.getLogger("fleetrun.secrets")


class SecretError(Exception):
    """A secret could not be read; the message names where from, never the value."""


class _Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()
        #: The same values as UTF-8, for output, which is bytes and is read in pieces.
        self.encoded: tuple[bytes, ...] = ()
        self.variables: frozenset[str] = frozenset()

    def add(self, value: str) -> None:
        with self._lock:
            if value not in self._values:
                # Longest first, so that a secret containing another is replaced whole.
                self._values = tuple(sorted({*self._values, value}, key=len, reverse=True))
                self.encoded = tuple(v.encode() for v in self._values)

    def add_variable(self, name: str) -> None:
        with self._lock:
            self.variables = self.variables | {name}

    def redact(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


_registry = _Registry()


def register_secret(value: str) -> None:
    """Remember ``value`` so that :func:`redact` hides it from now on."""
    if len(value) < MIN_SECRET_LENGTH:
        raise SecretError(f"a secret must be at least {MIN_SECRET_LENGTH} characters long")
    _registry.add(value)


def redact(text: str | None) -> str | None:
    """``text`` with every known secret replaced by ``***``."""
    return _registry.redact(text) if text else text


def secret_variables() -> frozenset[str]:
    """The names of the environment variables that secrets were read from (or were to be:
    also one that held too short a value). Commands started on this machine do not inherit
    them; they are there for fleetrun."""
    return _registry.variables


def command_environment(extra: Mapping[str, str]) -> dict[str, str] | None:
    """The environment for a command run on this machine: this process's, without the
    variables secrets are read from, with ``extra`` on top; None when that is the
    environment as it is."""
    withheld = [name for name in secret_variables() if name in os.environ]
    if not withheld and not extra:
        return None  # inheriting it as it is spares an encode of every variable
    env = {name: value for name, value in os.environ.items() if name not in withheld}
    env.update(extra)
    return env


def longest_secret() -> int:
    """The length in bytes of the longest known secret (0: none): how much of the text
    around a piece of output :func:`redact_bytes` needs to see."""
    encoded = _registry.encoded
    return len(encoded[0]) if encoded else 0


def redact_bytes(data: bytes, *, before: bytes = b"", after: bytes = b"") -> bytes:
    """``data``, a piece of output, with each run of bytes that belong to a known secret
    replaced by ``***``: also a secret the piece holds only part of, found in the bytes
    ``before`` and ``after`` it (up to :func:`longest_secret` - 1 of each are enough).

    Redacting each piece on its own would let a reader see a secret cut between two pieces
    (or read one byte at a time) in full.
    """
    encoded = _registry.encoded
    if not encoded or not data:
        return data
    text = before + data + after
    start, end = len(before), len(before) + len(data)
    hidden = bytearray(len(data))
    for value in encoded:
        found = text.find(value, max(0, start - len(value) + 1))
        while 0 <= found < end:
            for index in range(max(found, start), min(found + len(value), end)):
                hidden[index - start] = 1
            found = text.find(value, found + 1)
    if not any(hidden):
        return data
    pieces, index = [], 0
    while index < len(data):
        run_end = index
        while run_end < len(data) and hidden[run_end] == hidden[index]:
            run_end += 1
        pieces.append(REDACTED.encode() if hidden[index] else data[index:run_end])
        index = run_end
    return b"".join(pieces)


def secret_begun_at_end(data: bytes) -> int:
    """How many bytes at the end of ``data`` are the beginning of a known secret (and not
    all of it): bytes to hold back while what follows them is not known yet."""
    longest = 0
    for value in _registry.encoded:
        for length in range(min(len(value) - 1, len(data)), longest, -1):
            if data.endswith(value[:length]):
                longest = length
                break
    return longest


def secret_ended_at_start(data: bytes) -> int:
    """How many bytes at the start of ``data`` are the end of a known secret (and not all
    of it): bytes to drop when what came before them is not known."""
    longest = 0
    for value in _registry.encoded:
        for length in range(min(len(value) - 1, len(data)), longest, -1):
            if data.startswith(value[-length:]):
                longest = length
                break
    return longest


def read_secret(*, env: str | None, file: str | None, what: str, min_length: int = MIN_SECRET_LENGTH) -> str | None:
    """The secret in environment variable ``env`` or in ``file`` (one of them), registered.

    A file must not be readable by group or others; its trailing newline is dropped. A
    secret shorter than ``min_length`` (at least :data:`MIN_SECRET_LENGTH`) is refused.
    """
    if env:
        _registry.add_variable(env)
        value = os.environ.get(env)
        if value is None:
            raise SecretError(f"{what}: environment variable {env} is not set")
    elif file:
        try:
            path = paths.expand_home(file, given_by=what)
        except paths.HomeDirectoryError as exc:
            raise SecretError(str(exc)) from None
        try:
            mode = path.stat().st_mode
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"{what}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"{what}: {path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    else:
        return None
    if not value:
        raise SecretError(f"{what}: the secret is empty")
    min_length = max(min_length, MIN_SECRET_LENGTH)
    if len(value) < min_length:
        origin = f"${env}" if env else str(file)
        raise SecretError(f"{what} ({origin}) is {len(value)} characters long; use at least {min_length}")
    register_secret(value)
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that hides secrets in every record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _registry.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _registry.redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactingFilter` to every handler of ``logger`` (the root by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
