"""YAML read as a tree of nodes, so that every value keeps the line it was written on.

The hosts file and the policy are checked node by node, and each error names its line.
Reading goes through libyaml when PyYAML has it (a 5,000-host inventory in a tenth of
the time); a file libyaml refuses is read again by PyYAML's own parser, whose messages
say more ("found undefined alias 'web'", not "found undefined alias").
"""

from __future__ import annotations

from typing import Any, Callable

import yaml
import yaml.constructor

_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"

#: Makes the error for a node: (node, message) -> the exception to raise.
NodeError = Callable[[yaml.Node, str], Exception]


class YamlSyntaxError(Exception):
    """Text that is not YAML: ``problem`` in words, ``line`` (1-based) when known."""

    def __init__(self, problem: str, line: int | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.line = line


def compose(text: str) -> yaml.Node | None:
    """The node tree of one YAML document (None for an empty one); raises :class:`YamlSyntaxError`."""
    try:
        return yaml.compose(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        pass  # read again below, for PyYAML's fuller message
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces, never tabs)"
        raise YamlSyntaxError(problem, mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        # A control character, say: its message spans lines and counts characters, not lines.
        line = text.count("\n", 0, exc.position) + 1
        raise YamlSyntaxError(f"character {exc.character:#06x} is not allowed in YAML", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(" ".join(str(exc).split()), None) from None


def is_extension_key(key: str) -> bool:
    """Whether a top-level ``key`` is one the program ignores: ``x-NAME``, a place for anchors
    that several entries bring in (``<<: *ssh-defaults``), as Docker Compose files have."""
    return key.startswith("x-") and len(key) > 2


def is_null(node: yaml.Node) -> bool:
    """Whether ``node`` is YAML's null: an empty value, ``~`` or ``null``."""
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


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
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG:
            if merge_key is not None:
                raise error(key_node, "duplicate merge key '<<': name several mappings in one list instead")
            merge_key = key_node
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise error(key_node, "a merge key '<<' takes a mapping (*anchor) or a list of them")
                if source is node or source in merging:
                    raise error(key_node, "a merge key '<<' that brings in the mapping it is part of")
                for key, entry in _entries(source, error, merging=(*merging, node)).items():
                    merged.setdefault(key, entry)
            continue
        if not isinstance(key_node, yaml.ScalarNode):
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
    if isinstance(node, yaml.ScalarNode):
        try:
            return scalars.construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            raise error(node, exc.problem or "a value YAML cannot read") from None
    if node in active:
        raise error(node, "a value that contains itself (an alias inside its own anchor)")
    inner = (*active, node)
    if isinstance(node, yaml.SequenceNode):
        return [_value(item, error, scalars, active=inner) for item in node.value]
    if isinstance(node, yaml.MappingNode):
        entries = mapping_entries(node, error)
        return {key: _value(value_node, error, scalars, active=inner) for key, (_, value_node) in entries.items()}
    raise error(node, f"a YAML node of an unknown kind ({type(node).__name__})")
