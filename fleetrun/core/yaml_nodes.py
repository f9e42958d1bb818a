"""YAML read as a tree of nodes, so that every value keeps the line it was written on.

The hosts file and the policy are checked node by node, and each error names its line.
Parsing goes through libyaml when PyYAML has it (a 5,000-host inventory in a quarter of
the time); a file libyaml refuses is parsed again by PyYAML's own parser, whose messages
say more. The nodes are built here from the parser's events rather than by either
library's composer, to bound how deep they nest and what their aliases stand for.
"""

from __future__ import annotations

from typing import Any, Callable

import yaml
import yaml.constructor
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STANDARD_TAG_PREFIX = "tag:yaml.org,2002:"
_MERGE_TAG = _STANDARD_TAG_PREFIX + "merge"
_NULL_TAG = _STANDARD_TAG_PREFIX + "null"
#: Lists and mappings inside each other, or merge keys bringing in mappings that have their
#: own, at most this deep. These files need a handful of levels. libyaml's own composer
#: recursed once per level and crashed the process (SIGSEGV at 30,000 here); PyYAML's
#: raised RecursionError at 2,000.
MAX_NESTING = 100
#: What a value may stand for through aliases, in nodes: at most this many, or ten times
#: the nodes written inside it if that is more. Ten anchors that each name the one before
#: ten times stand for ten billion values, which reading would take hours to walk.
MAX_EXPANSION = 1_000_000
_EXPANSION_PER_WRITTEN_NODE = 10

#: Makes the error for a node: (node, message) -> the exception to raise.
NodeError = Callable[[yaml.Node, str], Exception]


class YamlReadError(Exception):
    """Text that cannot be read as these files' YAML: ``message`` in words (it says why),
    ``line`` (1-based) when known."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def compose(text: str) -> yaml.Node | None:
    """The node tree of one YAML document (None for an empty one); raises :class:`YamlReadError`."""
    try:
        return _compose(_FAST_LOADER(text))
    except yaml.YAMLError:
        pass  # read again below, for PyYAML's fuller message
    try:
        return _compose(yaml.SafeLoader(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces, never tabs)"
        raise YamlReadError(f"invalid YAML: {problem}", mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        # A control character, say: its message spans lines and counts characters, not lines.
        line = text.count("\n", 0, exc.position) + 1
        raise YamlReadError(f"invalid YAML: character {exc.character:#06x} is not allowed in YAML", line) from None
    except yaml.YAMLError as exc:
        raise YamlReadError("invalid YAML: " + " ".join(str(exc).split()), None) from None


class _Open:
    """A list or mapping whose end has not been read yet."""

    __slots__ = ("node", "anchor", "expansion", "written_before", "key")

    def __init__(self, node: yaml.CollectionNode, anchor: str | None, written_before: int) -> None:
        self.node = node
        self.anchor = anchor
        self.expansion = 1  # the nodes it stands for, aliases followed
        self.written_before = written_before
        self.key: yaml.Node | None = None  # a mapping's key, until its value is read


def _compose(loader: Any) -> yaml.Node | None:
    """Build the node tree from the parser's events, as PyYAML's composer does, but without
    recursion (see :data:`MAX_NESTING`) and counting what the aliases make each value stand
    for (see :data:`MAX_EXPANSION`). Parse errors propagate as PyYAML raises them."""
    anchors: dict[str, tuple[yaml.Node, int | None]] = {}  # size None: still open
    stack: list[_Open] = []
    root: yaml.Node | None = None
    documents = written = 0
    next_event, resolve = loader.get_event, loader.resolve
    try:
        while True:
            event = next_event()
            kind = type(event)
            line = event.start_mark.line + 1
            if kind is ScalarEvent:
                tag = event.tag if event.tag not in (None, "!") else resolve(ScalarNode, event.value, event.implicit)
                node: yaml.Node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
                written += 1
                expansion: int = 1
                if event.anchor is not None:
                    _add_anchor(anchors, event.anchor, node, 1, line)
            elif kind is AliasEvent:
                if event.anchor not in anchors:
                    raise YamlReadError(f"invalid YAML: found undefined alias {event.anchor!r}", line)
                node, size = anchors[event.anchor]
                expansion = size or 1  # an alias inside its own anchor: reading the value says so
            elif kind is SequenceStartEvent or kind is MappingStartEvent:
                if len(stack) >= MAX_NESTING:
                    raise YamlReadError(f"lists and mappings nested more than {MAX_NESTING} levels deep", line)
                node_class = SequenceNode if kind is SequenceStartEvent else MappingNode
                tag = event.tag if event.tag not in (None, "!") else resolve(node_class, None, event.implicit)
                node = node_class(tag, [], event.start_mark, None, flow_style=event.flow_style)
                written += 1
                if event.anchor is not None:
                    _add_anchor(anchors, event.anchor, node, None, line)
                stack.append(_Open(node, event.anchor, written - 1))
                continue
            elif kind is SequenceEndEvent or kind is MappingEndEvent:
                done = stack.pop()
                node, expansion = done.node, done.expansion
                node.end_mark = event.end_mark
                if expansion > max(MAX_EXPANSION, _EXPANSION_PER_WRITTEN_NODE * (written - done.written_before)):
                    what = "the value that starts here" if stack else "the file"
                    raise YamlReadError(
                        f"through its aliases, {what} stands for more than {MAX_EXPANSION:,} values "
                        "(anchors that bring in other anchors, many times over)",
                        node.start_mark.line + 1,
                    )
                if done.anchor is not None:
                    anchors[done.anchor] = (node, expansion)
            elif kind is DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise YamlReadError("invalid YAML: a second document (after ---); the file must hold one", line)
                continue
            elif kind is StreamEndEvent:
                return root
            else:
                continue  # the start of the stream, the end of the document
            if not stack:
                root = node
                continue
            parent = stack[-1]
            parent.expansion += expansion
            if isinstance(parent.node, SequenceNode):
                parent.node.value.append(node)
            elif parent.key is None:
                parent.key = node
            else:
                parent.node.value.append((parent.key, node))
                parent.key = None
    finally:
        loader.dispose()


def _add_anchor(anchors: dict[str, tuple[yaml.Node, int | None]], anchor: str, node: yaml.Node, size: int | None, line: int) -> None:
    if anchor in anchors:
        first = anchors[anchor][0].start_mark.line + 1
        raise YamlReadError(f"invalid YAML: found duplicate anchor {anchor!r} (first on line {first})", line)
    anchors[anchor] = (node, size)


def is_extension_key(key: str) -> bool:
    """Whether a top-level ``key`` is one the program ignores: ``x-NAME``, a place for anchors
    that several entries bring in (``<<: *ssh-defaults``), as Docker Compose files have."""
    return key.startswith("x-") and len(key) > 2


def is_null(node: yaml.Node) -> bool:
    """Whether ``node`` is YAML's null: an empty value, ``~`` or ``null``."""
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def scalar_text(node: yaml.Node) -> str | None:
    """A scalar's text as written, or None for null, a list or a mapping. Names, users,
    commands and environment values are text: ``user: 1000`` means "1000" and ``allow: true``
    the command ``true``, not YAML 1.1's number and boolean."""
    if isinstance(node, ScalarNode) and not is_null(node):
        return node.value
    return None


def mapping_entries(node: yaml.MappingNode, error: NodeError) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A YAML mapping's entries by key, as (key node, value node). A key written twice is
    an error: YAML loaders keep the last one, and the first would be dropped unseen.

    Keys are taken as written (``1:`` is the name ``"1"``).

    A merge key (``<<: *anchor``, or a list of them) brings in the entries of the mappings
    it names, as YAML loaders do: the mapping's own keys win, then the earlier-named mapping.
    """
    return _entries(node, error, merging=())


def _entries(node: yaml.MappingNode, error: NodeError, *, merging: tuple[yaml.Node, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merge_key: yaml.Node | None = None
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE_TAG:
            if merge_key is not None:
                raise error(key_node, "duplicate merge key '<<': name several mappings in one list instead")
            merge_key = key_node
            sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, MappingNode):
                    raise error(key_node, "a merge key '<<' takes a mapping (*anchor) or a list of them")
                if source is node or source in merging:
                    raise error(key_node, "a merge key '<<' that brings in the mapping it is part of")
                if len(merging) >= MAX_NESTING:
                    raise error(key_node, f"merge keys '<<' that bring in mappings with merge keys, more than {MAX_NESTING} deep")
                for key, entry in _entries(source, error, merging=(*merging, node)).items():
                    merged.setdefault(key, entry)
            continue
        if not isinstance(key_node, ScalarNode):
            raise error(key_node, "a key must be a name, not a list or a mapping")
        # Every key in these files is a name: a host called `1` or `yes` is meant as the
        # text written, not as YAML 1.1's number or boolean.
        if key_node.value in own:
            raise error(key_node, f"duplicate key {key_node.value!r}")
        own[key_node.value] = (key_node, value_node)
    return {**merged, **own}


def node_value(node: yaml.Node, error: NodeError) -> Any:
    """The Python value of ``node``: a scalar as YAML types it, lists, and mappings read
    through :func:`mapping_entries` (so with the same checks). The tree is left as it was."""
    # A constructor per call: each one keeps every node it has read.
    return _value(node, error, yaml.constructor.SafeConstructor(), active=())


def _value(node: yaml.Node, error: NodeError, scalars: yaml.constructor.SafeConstructor, *, active: tuple[yaml.Node, ...]) -> Any:
    if isinstance(node, ScalarNode):
        try:
            return scalars.construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            raise error(node, exc.problem or "a value YAML cannot read") from None
        except (ValueError, LookupError, AttributeError):
            # PyYAML's constructors trust the tag: `!!int x` is int('x'), `!!bool x` a KeyError.
            tag = node.tag.replace(_STANDARD_TAG_PREFIX, "!!")
            raise error(node, f"{node.value!r} cannot be read as {tag}; leave the tag out, or write a value of its type") from None
    if node in active:
        raise error(node, "a value that contains itself (an alias inside its own anchor)")
    inner = (*active, node)
    if isinstance(node, SequenceNode):
        return [_value(item, error, scalars, active=inner) for item in node.value]
    if isinstance(node, MappingNode):
        entries = mapping_entries(node, error)
        return {key: _value(value_node, error, scalars, active=inner) for key, (_, value_node) in entries.items()}
    raise error(node, f"a YAML node of an unknown kind ({type(node).__name__})")
