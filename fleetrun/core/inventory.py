"""The hosts inventory: which hosts exist, how they are reached, and their limits.

A hosts file is YAML::

    defaults:            # optional: limits every host starts from
      max_seconds: 600
    tags:                # optional: limits for the hosts with a tag
      batch: {max_seconds: 7200}
    hosts:
      local:
        transport: local
        tags: [dev]

A host's limits are, in order of precedence: its own fields, then those of its tags (the
lowest value when several tags set one), then ``defaults``. A request can lower them.

Validation walks the YAML node tree (not the parsed values) so that every error can
name the file, the line, the host and the field.
"""

from __future__ import annotations

import decimal
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from fleetrun.core import paths
from fleetrun.core.errors import InventoryError, UnknownHostError
from fleetrun.core.models import Limits
from fleetrun.core.text import argument_problem, printable
from fleetrun.core.transport import HostField, Transport
from fleetrun.core.yaml_nodes import (
    YamlReadError,
    compose,
    is_extension_key,
    is_null,
    mapping_entries,
    node_value,
    scalar_text,
)

#: A whole host name (or tag): use ``fullmatch`` (``$`` would let a trailing newline through).
HOST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
TAG_RE = HOST_NAME_RE

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def environment_problem(env: Mapping[str, str]) -> str | None:
    """What is wrong with an environment to add to commands, or None.

    Remote transports have the shell set these: a name must be only a name.
    """
    for name, value in env.items():
        if not _ENV_NAME_RE.fullmatch(name):
            return f"invalid environment variable name {name!r}: use ASCII letters, digits and '_'"
        problem = argument_problem(value, f"the value of environment variable {name!r}")
        if problem is not None:
            return problem
    return None


#: Fields every host may set, whatever its transport.
COMMON_HOST_FIELDS: Mapping[str, HostField] = {
    "transport": HostField("string", "how the host is reached (default: local)"),
    "description": HostField("string", "free text shown by `fleetrun hosts`"),
    "tags": HostField("string-list", "labels for selecting hosts in groups"),
    "max_seconds": HostField("number", "time limit of a task, in seconds"),
    # The store keeps it in a 64-bit column: a bigger number lost the task's record.
    "max_output_bytes": HostField("integer", "bytes kept of each of stdout and stderr", maximum=10**18),
    "max_concurrent": HostField("integer", "tasks running at once on this host"),
    "max_queued": HostField("integer", "tasks that may wait for their turn on this host; more are refused"),
    "env": HostField("string-map", "environment variables added to every command", validate=environment_problem),
    "cwd": HostField("string", "working directory of every command"),
}
#: Fields someone might try to put a secret in; the error says where secrets go instead.
SECRET_FIELD_NAMES = ("password", "passphrase", "secret", "token")
LIMIT_FIELDS = ("max_seconds", "max_output_bytes", "max_concurrent", "max_queued")
TOP_LEVEL_KEYS = ("defaults", "tags", "hosts")

DEFAULT_SOURCE = "<embedded default inventory>"


@dataclass(frozen=True)
class Host:
    """One host of the inventory. ``options`` holds its transport-specific fields."""

    name: str
    transport: str = "local"
    description: str | None = None
    tags: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Inventory:
    """The hosts fleetrun knows, and where that knowledge came from."""

    hosts: Mapping[str, Host]
    source: str = DEFAULT_SOURCE

    def get(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise UnknownHostError(
                f"unknown host {name!r} ({names_hint(name, self.hosts, 'known hosts')}; inventory: {self.source})"
            ) from None

    def with_tag(self, tag: str) -> list[Host]:
        return [h for h in self.hosts.values() if tag in h.tags]


#: Up to this many names are listed in full when a name is not found; beyond, the closest.
NAMES_LISTED = 20


def names_hint(asked: str, names: Iterable[str], what: str) -> str:
    """``known hosts: a, b`` when there are a few names; when there are many, how many and
    the ones closest to ``asked``, so that an error stays one readable line."""
    names = sorted(names)
    if not names:
        return f"{what}: none"
    if len(names) <= NAMES_LISTED:
        return f"{what}: {', '.join(names)}"
    close = [repr(name) for name in difflib.get_close_matches(asked, names, n=3)]
    if not close:
        return f"{len(names)} {what}"
    choices = f"{', '.join(close[:-1])} or {close[-1]}" if len(close) > 1 else close[0]
    return f"did you mean {choices}? {len(names)} {what}"


def default_inventory() -> Inventory:
    """The inventory used when no hosts file exists: one host, ``local``."""
    return Inventory(
        hosts={"local": Host(name="local", transport="local", description="this machine")},
        source=DEFAULT_SOURCE,
    )


def find_hosts_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The hosts file to use: ``explicit``, then ``$FLEETRUN_HOSTS``, then the config dir.

    An explicit or environment path must exist; the config-dir file is optional.
    """
    return paths.find_config_file(
        explicit, flag="--hosts", env=paths.HOSTS_ENV, name="hosts.yaml",
        not_found=lambda path, origin, problem: InventoryError(f"hosts file {problem} (given by {origin})", path=path),
    )


def load_inventory(
    explicit: str | os.PathLike[str] | None = None,
    transports: Mapping[str, type[Transport]] | None = None,
) -> Inventory:
    """Find and load the hosts file, or return the embedded default inventory."""
    path = find_hosts_file(explicit)
    if path is None:
        return default_inventory()
    text = InventoryError.read_text(path)
    return parse_inventory(text, source=str(path), transports=transports)


def parse_inventory(
    text: str,
    *,
    source: str = "<string>",
    transports: Mapping[str, type[Transport]] | None = None,
) -> Inventory:
    """Parse and validate hosts-file text; raise :class:`InventoryError` on any problem."""
    return _InventoryParser(source, transports).parse(text)


#: Said when a field other than a limit is put in 'defaults' or under a tag.
_SHARE_HINT = "; to give several hosts the same other fields, write them once under x-NAME: &NAME and bring them in with <<: *NAME"


#: A number with an exponent. YAML 1.1, which PyYAML reads, takes 1e9 as text (it wants
#: 1.0e+9) and 1.0e+9 as a float; both are read here as YAML 1.2 reads them, and a whole
#: one is an integer (max_output_bytes: 1e9).
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def _exponent_number(text: str) -> int | float:
    """``text`` (an :data:`_EXPONENT_NUMBER`) as an int when it is a whole number of at most 30
    digits, else a float (an int of 1e1000000000 would take the memory of its digits)."""
    exact = decimal.Decimal(text)
    if 0 <= exact.adjusted() < 30 and exact == exact.to_integral_value():
        return int(exact)
    return float(exact)


def _number(value: float) -> str:
    """A bound or a value as written: every digit of an integer (``:g`` made 10**18 "1e+18")."""
    return str(value) if isinstance(value, int) else f"{value:g}"


class _InventoryParser:
    def __init__(self, source: str, transports: Mapping[str, type[Transport]] | None) -> None:
        self.source = source
        self.transports = transports
        self.tag_limits: dict[str, dict[str, Any]] = {}

    def error(
        self, node: yaml.Node | None, message: str, *, host: str | None = None, field: str | None = None
    ) -> InventoryError:
        line = node.start_mark.line + 1 if node is not None else None
        return InventoryError(message, path=self.source, line=line, host=host, field=field)

    def parse(self, text: str) -> Inventory:
        try:
            root = compose(text)
        except YamlReadError as exc:
            raise InventoryError(exc.message, path=self.source, line=exc.line) from None
        if root is None:
            raise InventoryError("the file is empty; it needs a 'hosts:' mapping", path=self.source, line=1)
        top = self.mapping(root, "the top level must be a mapping with a 'hosts:' key")
        for key, key_node in ((k, kn) for k, (kn, _) in top.items()):
            if key not in TOP_LEVEL_KEYS and not is_extension_key(key):
                raise self.error(
                    key_node, f"unknown top-level key {key!r} (allowed: {', '.join(TOP_LEVEL_KEYS)}, and x-NAME for anchors)"
                )
        defaults = Limits()
        if "defaults" in top:
            specs = {name: COMMON_HOST_FIELDS[name] for name in LIMIT_FIELDS}
            entries = self.mapping(top["defaults"][1], "'defaults' must be a mapping of fields")
            values = self.fields(entries, specs, host=None, unknown="unknown field in 'defaults'", hint=_SHARE_HINT)
            defaults = self.limits(values, Limits())
        tag_limits: dict[str, dict[str, Any]] = {}
        if "tags" in top:
            specs = {name: COMMON_HOST_FIELDS[name] for name in LIMIT_FIELDS}
            for tag, (tag_node, body) in self.mapping(top["tags"][1], "'tags' must be a mapping of tag to limits").items():
                if not TAG_RE.fullmatch(tag):
                    raise self.error(tag_node, f"invalid tag {tag!r}")
                entries = self.mapping(body, f"tag {tag!r} must be a mapping of limit fields")
                tag_limits[tag] = self.fields(entries, specs, host=None, unknown=f"unknown field in tag {tag!r}", hint=_SHARE_HINT)
        self.tag_limits = tag_limits
        if "hosts" not in top:
            raise self.error(root, "missing the 'hosts:' mapping")
        hosts_node = top["hosts"][1]
        entries = self.mapping(hosts_node, "'hosts' must be a mapping of host name to its fields")
        if not entries:
            raise self.error(hosts_node, "'hosts' is empty: define at least one host")
        hosts: dict[str, Host] = {}
        for name, (name_node, body) in entries.items():
            if not HOST_NAME_RE.fullmatch(name):
                raise self.error(
                    name_node,
                    "invalid host name: use ASCII letters, digits, '.', '_' and '-' (at most 63, not starting with a punctuation mark)",
                    host=name,
                )
            hosts[name] = self.host(name, name_node, body, defaults)
        return Inventory(hosts=hosts, source=self.source)

    def mapping(
        self, node: yaml.Node, message: str, *, host: str | None = None, field: str | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, message, host=host, field=field)
        return mapping_entries(node, lambda at, problem: self.error(at, problem, host=host, field=field))

    def host(self, name: str, name_node: yaml.Node, body: yaml.Node, defaults: Limits) -> Host:
        if is_null(body):
            entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        else:
            if not isinstance(body, yaml.MappingNode):
                raise self.error(body, "a host must be a mapping of fields", host=name)
            entries = self.mapping(body, "a host must be a mapping of fields", host=name)
        transport_name = "local"
        transport_key = name_node
        if "transport" in entries:
            transport_key, transport_node = entries["transport"]
            transport_name = self.value(transport_node, "string", host=name, field="transport")
        specs: Mapping[str, HostField] | None = None  # None: no registry, keep unknown fields as options
        if self.transports is not None:
            cls = self.transports.get(transport_name)
            if cls is None:
                available = ", ".join(sorted(self.transports)) or "none"
                raise self.error(
                    transport_key,
                    f"unknown transport {transport_name!r} (available: {available})",
                    host=name,
                    field="transport",
                )
            specs = {**COMMON_HOST_FIELDS, **cls.host_fields}
        values = self.fields(entries, specs, host=name, unknown=f"unknown field for transport {transport_name!r}")
        tags = tuple(values.get("tags", ()))
        from_tags: dict[str, Any] = {}
        for tag in tags:
            for field_name, value in self.tag_limits.get(tag, {}).items():
                from_tags[field_name] = min(value, from_tags.get(field_name, value))  # several tags: the strictest
        if from_tags:
            defaults = self.limits(from_tags, defaults)
        return Host(
            name=name,
            transport=transport_name,
            description=values.get("description"),
            tags=tags,
            limits=self.limits(values, defaults),
            env=dict(values.get("env", {})),
            cwd=values.get("cwd"),
            options={k: v for k, v in values.items() if k not in COMMON_HOST_FIELDS},
        )

    def fields(
        self,
        entries: dict[str, tuple[yaml.Node, yaml.Node]],
        specs: Mapping[str, HostField] | None,
        *,
        host: str | None,
        unknown: str,
        hint: str = "",
    ) -> dict[str, Any]:
        """Check each field against its spec; return field -> value.

        With ``specs`` None, fields outside the common ones are kept unchecked.
        """
        out: dict[str, Any] = {}
        for key, (key_node, value_node) in entries.items():
            spec = (specs if specs is not None else COMMON_HOST_FIELDS).get(key)
            if spec is None and key in SECRET_FIELD_NAMES:
                raise self.error(
                    key_node,
                    "secrets do not belong in the hosts file: name an environment variable or a file that "
                    f"holds it ({key}_env: NAME or {key}_file: PATH)",
                    host=host, field=key,
                )
            if spec is None and specs is not None:
                raise self.error(key_node, f"{unknown} (allowed: {', '.join(sorted(specs))}){hint}", host=host, field=key)
            out[key] = self.value(value_node, spec.kind if spec else None, host=host, field=key)
            if spec is not None:
                self.check_bounds(value_node, out[key], spec, host=host, field=key)
        return out

    def check_bounds(self, node: yaml.Node, value: Any, spec: HostField, *, host: str | None, field: str) -> None:
        if spec.choices and value not in spec.choices:
            allowed = ", ".join(spec.choices)
            raise self.error(node, f"expected one of {allowed}, got {value!r}", host=host, field=field)
        if spec.minimum is not None and value < spec.minimum:
            raise self.error(node, f"must be at least {_number(spec.minimum)}, got {_number(value)}", host=host, field=field)
        if spec.maximum is not None and value > spec.maximum:
            raise self.error(node, f"must be at most {_number(spec.maximum)}, got {_number(value)}", host=host, field=field)
        problem = spec.validate(value) if spec.validate is not None else None
        if problem:
            raise self.error(node, problem, host=host, field=field)

    def value(self, node: yaml.Node, kind: str | None, *, host: str | None, field: str) -> Any:
        # Read for every kind, also those taken as text below: this is what refuses a tag
        # YAML cannot read (!vault) and an alias inside its own anchor.
        value = node_value(node, lambda at, problem: self.error(at, problem, host=host, field=field))
        if kind is None:
            # An unknown field: host() reports it with the allowed names.
            return value

        def fail(expected: str) -> InventoryError:
            shown = value if isinstance(node, yaml.ScalarNode) else type(value).__name__
            return self.error(node, f"expected {expected}, got {shown!r}", host=host, field=field)

        if kind == "string":
            text = scalar_text(node)
            if text is None:
                raise fail("a string")
            if not text:
                raise self.error(node, "must not be empty", host=host, field=field)
            problem = argument_problem(text, "the value")  # a NUL failed each task in its transport
            if problem is not None:
                raise self.error(node, problem, host=host, field=field)
            return text
        if kind == "boolean":
            if not isinstance(value, bool):
                raise fail("true or false")
            return value
        if kind in ("integer", "number"):
            if isinstance(node, yaml.ScalarNode) and node.style in (None, "") and _EXPONENT_NUMBER.fullmatch(node.value):
                value = _exponent_number(node.value)
            allowed = (int,) if kind == "integer" else (int, float)
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise fail("an integer" if kind == "integer" else "a number")
            if not math.isfinite(value):  # YAML's .inf and .nan: no limit or timeout means anything with them
                raise fail("a finite number")
            if field in LIMIT_FIELDS and not value > 0:
                raise self.error(node, f"must be greater than 0, got {value}", host=host, field=field)
            return value
        if kind == "string-list":
            if not isinstance(node, yaml.SequenceNode):
                raise fail("a list of strings")
            items = []
            for item_node in node.value:
                item = scalar_text(item_node)
                if not item:
                    raise self.error(item_node, "every item must be a non-empty string", host=host, field=field)
                problem = argument_problem(item, f"item '{printable(item)}'")
                if problem is not None:
                    raise self.error(item_node, problem, host=host, field=field)
                if field == "tags" and not TAG_RE.fullmatch(item):
                    raise self.error(item_node, f"invalid tag {item!r}", host=host, field=field)
                items.append(item)
            return items
        if kind == "string-map":
            entries = self.mapping(node, "expected a mapping of names to strings", host=host, field=field)
            out = {}
            for key, (_, value_node) in entries.items():
                text = scalar_text(value_node)
                if text is None:
                    hint = " (write '' for an empty one)" if is_null(value_node) else ""
                    raise self.error(value_node, f"the value of {key!r} must be a string{hint}", host=host, field=field)
                out[key] = text
            return out
        raise ValueError(f"unknown host field kind {kind!r}")

    @staticmethod
    def limits(values: Mapping[str, Any], base: Limits) -> Limits:
        return Limits(
            max_seconds=float(values["max_seconds"]) if "max_seconds" in values else base.max_seconds,
            max_output_bytes=int(values.get("max_output_bytes", base.max_output_bytes)),
            max_concurrent=int(values.get("max_concurrent", base.max_concurrent)),
            max_queued=int(values.get("max_queued", base.max_queued)),
        )
