"""YAML for manifests with bounds on size, nesting and alias expansion.

PyYAML's composer follows aliases by sharing nodes, so a 650-byte file of nested aliases
("billion laughs") loads into a small graph that any later walk (an error message, a
json.dumps) expands to billions of values. `ManifestLoader` composes documents itself from
the parser's events and counts every node as it would be once aliases are expanded, so such
a file, a recursive alias or runaway nesting is refused before anything is constructed, in
time and memory proportional to the bytes read. It also refuses integers no Kubernetes
field can hold and timestamps that do not exist, which PyYAML lets escape as ValueError.
"""

from __future__ import annotations

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.resolver import Resolver

try:
    from yaml.cyaml import CParser as _EventSource  # libyaml: the same events, faster
except ImportError:  # PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _EventSource(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


MAX_BYTES = 1 << 20  # 1 MiB per file: ample for thousands of objects
# Real manifests take 6 bytes or more per node (a key or a value); the densest YAML takes 1.
MAX_NODES = MAX_BYTES // 4
MAX_DEPTH = 100  # Kubernetes objects nest about 10 deep; this keeps Python's recursion far off
INT_BITS = 64  # Kubernetes' widest integer field is an int64
MAX_INT_TEXT = 100  # longer integer text is refused unread: sexagesimal 1:2:3... is quadratic


class YAMLLimitError(yaml.MarkedYAMLError):
    """Parseable YAML svcbench refuses: too many nodes, too deep, recursive, or out of range."""

    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


def shortened(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


class _BoundedComposer(Composer):
    """PyYAML's composer, counting nodes and depth as if every alias were expanded."""

    def __init__(self):
        super().__init__()
        self.expanded = 0  # nodes of the stream so far, an alias counting its anchor's tree
        self._depth = 0
        self._deepest = 0  # the deepest level reached inside the anchored node being composed
        self._open: set[str] = set()  # anchors whose node is being composed
        self._trees: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, height)

    def compose_document(self):
        self._trees = {}  # anchors are local to a document
        return super().compose_document()

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self._open:
                raise YAMLLimitError(
                    f"the alias *{shortened(event.anchor)} is inside the node it names; "
                    "recursive aliases never end",
                    event.start_mark,
                )
            nodes, height = self._trees.get(event.anchor, (0, 0))  # undefined: Composer says so
            self._grow(nodes, event)
            self._reach(self._depth + height, event)
            return super().compose_node(parent, index)
        self._depth += 1
        self._reach(self._depth, event)
        self._grow(1, event)
        anchor = event.anchor
        if anchor is None:
            node = super().compose_node(parent, index)
        else:
            if anchor in self.anchors:
                first = self.anchors[anchor].start_mark.line + 1
                raise ComposerError(
                    None, None,
                    f"the anchor &{shortened(anchor)} is defined twice (first on line {first}); "
                    "each anchor may appear once in a document",
                    event.start_mark,
                )  # fmt: skip
            before, deepest = self.expanded - 1, self._deepest
            self._deepest = self._depth
            self._open.add(anchor)
            node = super().compose_node(parent, index)
            self._open.discard(anchor)
            self._trees[anchor] = (self.expanded - before, self._deepest - self._depth + 1)
            self._deepest = max(deepest, self._deepest)
        self._depth -= 1
        return node

    def _grow(self, nodes: int, event) -> None:
        self.expanded += nodes
        if self.expanded > MAX_NODES:
            alias = isinstance(event, AliasEvent)
            what = f"the alias *{shortened(event.anchor)}" if alias else "this value"
            raise YAMLLimitError(
                f"{what} takes the file past {MAX_NODES:,} values (aliases counted each time "
                f"they are used), the most svcbench reads from one file",
                event.start_mark,
            )

    def _reach(self, depth: int, event) -> None:
        self._deepest = max(self._deepest, depth)
        if depth > MAX_DEPTH:
            raise YAMLLimitError(
                f"values nest deeper than {MAX_DEPTH} levels here (aliases counted expanded), "
                "the most svcbench reads",
                event.start_mark,
            )


class _BoundedConstructor(SafeConstructor):
    """SafeConstructor whose scalars fail as YAML errors instead of ValueError."""

    def construct_yaml_int(self, node):
        text = node.value
        if len(text) <= MAX_INT_TEXT:
            value = super().construct_yaml_int(node)
            if -(1 << (INT_BITS - 1)) <= value < 1 << (INT_BITS - 1):
                return value
        raise YAMLLimitError(
            f"the integer {shortened(text)} ({len(text)} characters) does not fit in "
            f"{INT_BITS} bits, the widest integer Kubernetes reads; quote it if it is a string",
            node.start_mark,
        )

    def construct_yaml_timestamp(self, node):
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise YAMLLimitError(
                f"{shortened(node.value)} is not a valid timestamp ({exc}); "
                "quote it if it is a string",
                node.start_mark,
            ) from None


_BoundedConstructor.add_constructor(
    "tag:yaml.org,2002:int", _BoundedConstructor.construct_yaml_int
)
_BoundedConstructor.add_constructor(
    "tag:yaml.org,2002:timestamp", _BoundedConstructor.construct_yaml_timestamp
)


class ManifestLoader(_BoundedComposer, _EventSource, _BoundedConstructor, Resolver):
    """yaml.SafeLoader's types, within MAX_NODES (aliases expanded), MAX_DEPTH and int64.

    The caller keeps the text within MAX_BYTES; use check_node/get_node, then
    construct_document, then dispose.
    """

    def __init__(self, text: str):
        _EventSource.__init__(self, text)
        _BoundedComposer.__init__(self)
        _BoundedConstructor.__init__(self)
        Resolver.__init__(self)
