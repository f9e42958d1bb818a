"""The hosts file and the policy file of a long-running process, followed as they change.

The MCP server runs for as long as the assistant that started it. People edit their
policy while it runs, often because the assistant has just been refused a command, and
expect the next request to be judged by what they wrote, not by what the file said when
the server started. So every plan reads the files' metadata (two ``stat`` calls) and, when
either file has changed, the executor takes both files as they are now.

A file that changed into something fleetrun cannot use (a slip in the YAML, a file given by
path and then deleted) stops all planning with the file's own error until it is fixed:
the person has just changed what may run, and keeping the previous policy would go on
allowing what they may have meant to forbid. Tasks already started go on, and can still
be followed and cancelled.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

from fleetrun.core import paths
from fleetrun.core.errors import FleetrunError
from fleetrun.core.inventory import Inventory, load_inventory
from fleetrun.core.policy import Policy, load_policy
from fleetrun.core.transport import Transport

log = logging.getLogger("fleetrun.config")

#: A file changed more recently than this may still be being written (most editors write
#: in place), and is read once it has been still for this long. Until then the previous
#: version applies, as it did a moment before the save.
SETTLE_SECONDS = 0.05


class _FileState(NamedTuple):
    """What a file looks like from outside: enough to notice any write or replacement."""

    path: Path
    #: When it was last written; None when it is not there (or cannot be looked at).
    mtime_ns: int | None
    #: Device, inode, size and change time; or why it could not be looked at.
    identity: tuple[object, ...]


_Signature = tuple[_FileState, ...]


@dataclass(frozen=True)
class Configuration:
    """What an executor plans requests with."""

    inventory: Inventory
    #: None: no policy applies (the CLI without one).
    policy: Policy | None


class ConfigFiles:
    """The hosts file and the policy file, found as at start (``--hosts``/``--policy``, the
    environment, the config directory) and read again whenever either changes on disk.

    :param hosts: the hosts file given on the command line, if any.
    :param policy: the policy file given on the command line, if any.
    :param transports: the transports that hosts may name (checked when the file is read).
    :param fallback_policy: the policy when no policy file is found (None: no policy).

    Reading the files at construction raises their errors, as a process starting on a bad
    file should fail. Afterwards, :meth:`refresh` takes a change.
    """

    def __init__(
        self,
        *,
        hosts: str | os.PathLike[str] | None = None,
        policy: str | os.PathLike[str] | None = None,
        transports: Mapping[str, type[Transport]] | None = None,
        fallback_policy: Callable[[], Policy] | None = None,
    ) -> None:
        self._hosts = hosts
        self._policy = policy
        self._transports = transports
        self._fallback_policy = fallback_policy
        self._lock = threading.Lock()
        self._seen = self._signature()
        #: Why the changed files cannot be used, while they cannot.
        self._problem: str | None = None
        #: The configuration in force: replaced (never changed) when the files change.
        self.current = self._load()
        _warn_about(self.current.policy)

    def refresh(self) -> Configuration:
        """The configuration in force, read again first if a file has changed since the last call.

        Raises :class:`FleetrunError` for as long as a changed file cannot be used; the
        message is the file's own error (file, line, field) and says that no restart is needed.
        """
        signature = self._signature()
        if signature != self._seen:
            with self._lock:
                if signature != self._seen:  # else another thread took this change meanwhile
                    self._take(signature)
        problem = self._problem
        if problem is not None:
            raise FleetrunError(problem)
        return self.current

    def _take(self, signature: _Signature) -> None:
        if not self._settled(signature):
            return  # the previous version (or its problem: a fix may be half written) applies a moment longer
        try:
            configuration = self._load()
        except FleetrunError as exc:
            problem = self._explained(exc)
            if self._problem != problem:
                log.error("the configuration changed and cannot be used: %s", exc)
            self._problem = problem
        else:
            if self._problem is not None:
                log.info("the configuration is usable again")
            self._report(configuration)
            # In this order: a thread that finds the new signature (without the lock) finds
            # the new configuration too.
            self.current = configuration
            self._problem = None
        self._seen = signature

    def _locations(self) -> tuple[Path, Path]:
        return (
            paths.config_file_location(self._hosts, env=paths.HOSTS_ENV, name="hosts.yaml"),
            paths.config_file_location(self._policy, env=paths.POLICY_ENV, name="policy.yaml"),
        )

    def _signature(self) -> _Signature:
        states = []
        for path in self._locations():
            try:
                found = path.stat()
            except OSError as exc:
                states.append(_FileState(path, None, (type(exc).__name__,)))
            else:
                identity = (found.st_dev, found.st_ino, found.st_size, found.st_ctime_ns)
                states.append(_FileState(path, found.st_mtime_ns, identity))
        return tuple(states)

    def _settled(self, signature: _Signature) -> bool:
        """Whether each file that changed since the last look has been still long enough."""
        now = time.time()
        for state, seen in zip(signature, self._seen):
            if state == seen:
                continue
            if state.mtime_ns is not None:
                age = now - state.mtime_ns / 1e9
            else:
                # Gone: for good, or for the moment an editor takes to save (vim renames the
                # old file away, then writes the new one). The directory says when it changed.
                try:
                    age = now - state.path.parent.stat().st_mtime
                except OSError:
                    continue
            if 0 <= age < SETTLE_SECONDS:  # a clock behind the file's (a network disk) must not hold it back
                return False
        return True

    def _load(self) -> Configuration:
        inventory = load_inventory(self._hosts, self._transports)
        policy = load_policy(self._policy)
        if policy is None and self._fallback_policy is not None:
            policy = self._fallback_policy()
        return Configuration(inventory, policy)

    @staticmethod
    def _explained(exc: FleetrunError) -> str:
        return (
            f"{exc} (the file changed while fleetrun was running: nothing new runs until it is fixed, "
            "and no restart is needed; tasks already started go on)"
        )

    def _report(self, configuration: Configuration) -> None:
        before = self.current
        if configuration.inventory != before.inventory:
            log.info("hosts changed: %d hosts from %s", len(configuration.inventory.hosts), configuration.inventory.source)
        if configuration.policy != before.policy:
            source = configuration.policy.source if configuration.policy is not None else "none"
            count = len(configuration.policy.rules) if configuration.policy is not None else 0
            log.info("policy changed: %d rules from %s", count, source)
            _warn_about(configuration.policy)


def _warn_about(policy: Policy | None) -> None:
    """Name the rules that let any command through (``allow: awk *``) once per policy read."""
    for warning in policy.warnings if policy is not None else ():
        log.warning("%s", warning)
