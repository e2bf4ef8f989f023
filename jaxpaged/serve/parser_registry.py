"""A flag's parsers by name (`--tool-call-parser`, `--reasoning-parser`): each class registers
itself under vLLM's name for it."""
from __future__ import annotations


class ParserRegistry(dict):
    """name -> parser class."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        """Class decorator: the parser answers to `name`."""
        def add(cls: type) -> type:
            self[name] = cls
            return cls
        return add

    def get_parser(self, name: str) -> type:
        """The parser named `name`; ValueError naming the choices otherwise."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}: one of {', '.join(sorted(self))}")
        return self[name]
