"""Where a key sits in a --config YAML file, for messages that name file, line and key."""

from __future__ import annotations

from pathlib import Path


def yaml_line(path: Path, key: str) -> int | None:
    """The 1-based line of a top-level key in a YAML mapping (None when not found)."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError):
        return None
    for key_node, _ in getattr(node, "value", []) if isinstance(node, yaml.MappingNode) else []:
        if key_node.value == key:
            return key_node.start_mark.line + 1
    return None
