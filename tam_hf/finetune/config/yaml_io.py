"""Reading and writing recipe YAML (the safe loader every recipe, override and study file goes through).

Reading goes through :class:`RecipeLoader`, a ``yaml.SafeLoader`` (plain data only: a tag that would build a
Python object is refused, never executed) that also refuses what a recipe never needs and a hostile file uses:

* a key given twice in one mapping (YAML keeps the last silently; here it is an error naming the key and both
  lines);
* nesting deeper than :data:`MAX_DEPTH` levels (the composer recurses: 1000 levels were a ``RecursionError``);
* more than :data:`MAX_VALUES` values once aliases are expanded, and aliases into themselves ("billion
  laughs": a few hundred bytes that expand to 10**9 strings ran 87 s into a ``MemoryError``). Aliases share
  the anchored node, so each node's expanded size is kept as the document is composed and the running total
  is checked as it grows: time proportional to the file, nothing big built first.

All three raise a ``yaml.YAMLError`` carrying the line, like any other syntax error.
"""

from __future__ import annotations

import reprlib

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.scanner import ScannerError

__all__ = ["RecipeLoader", "read_yaml", "dump_yaml", "describe", "short", "clip", "MAX_DEPTH", "MAX_VALUES"]

MAX_DEPTH = 32  # a recipe needs about 5 (section, setting, list, item); training passthroughs a few more
MAX_VALUES = 100_000  # scalars, lists and mappings once every alias is expanded

_MERGE = "tag:yaml.org,2002:merge"

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def short(value, limit: int = 60) -> str:
    """``repr`` of at most about ``limit`` characters, for messages that quote a value the user wrote."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 100) -> str:
    """``text`` cut to about ``limit`` characters, for messages that name a path or relay another message."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with duplicate keys, deep nesting and alias expansion refused (module docstring)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._open = 0  # nodes being composed right now: the composer's recursion depth
        self._shape: dict[int, tuple[int, int]] = {}  # id(node) -> (depth, values), aliases expanded
        self._values = 0

    def fetch_flow_collection_start(self, TokenClass):
        # the scanner reads a whole line of `[[[[...` before the composer sees the first one: stop it here
        if self.flow_level >= MAX_DEPTH:
            raise ScannerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            node = super().compose_node(parent, index)
            if id(node) not in self._shape:
                raise ComposerError(None, None, f"alias *{anchor} refers to a node that contains it", mark)
            self._count(self._shape[id(node)][1], mark)
            return node
        self._open += 1
        try:
            if self._open > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._open -= 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        depth = 1 + max((self._shape[id(c)][0] for c in children), default=0)
        if depth > MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels once aliases are expanded", mark)
        self._shape[id(node)] = (depth, 1 + sum(self._shape[id(c)][1] for c in children))
        self._count(1, mark)
        return node

    def _count(self, values: int, mark) -> None:
        """Values composed so far, an alias counting as everything it stands for: checked as they come, so
        neither an alias bomb nor a plain huge list is built before it is refused."""
        self._values += values
        if self._values > MAX_VALUES:
            raise ComposerError(None, None, f"more than {MAX_VALUES} values once aliases are expanded", mark)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:  # `<<: *base` then `key: value` is an override, not a duplicate
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if seen is not None:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found duplicate key {short(key)} (first at line {seen})",
                                           key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str | None = None):
    """Plain data from YAML text, through :class:`RecipeLoader`; raises ``yaml.YAMLError`` (naming ``source``,
    e.g. the file, and the line)."""
    loader = RecipeLoader(text)
    if source is not None:
        loader.name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def describe(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where, without the source line it quotes (a long or
    hostile line stays out of the message)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return clip(" ".join(str(exc).split()), 200)
    mark = exc.problem_mark or exc.context_mark
    text = " ".join(clip(t, 160) for t in (exc.context, exc.problem) if t)
    return f"{text} at line {mark.line + 1}, column {mark.column + 1}" if mark else text


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the instruction template) as readable literal blocks."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
