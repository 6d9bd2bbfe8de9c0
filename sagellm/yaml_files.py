"""Reading YAML files (configs, simulations, experiments, hardware specs) within fixed bounds.

A config file is a few KB. The bounds here are far above any real one and keep a hostile file (a
huge file, an alias bomb, deep nesting, binary data) from taking unbounded memory or time: each is
refused with an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sagellm.errors import ConfigError, show

MAX_YAML_BYTES = 4 * 2**20
MAX_YAML_EXPANDED = 1_000_000  # nodes plus scalar characters / 64, with every alias expanded
MAX_YAML_DEPTH = 200


def load_yaml_mapping(path: str | Path, what: str, error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """The mapping in a YAML file ({} for an empty file); `error` naming `what` and the path if the
    file is missing, is larger than MAX_YAML_BYTES, is not UTF-8 text or not YAML, nests deeper than
    MAX_YAML_DEPTH, would expand through aliases beyond MAX_YAML_EXPANDED, or holds something other
    than a mapping."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {str(p)!r} does not exist")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise error(f"{what} {str(p)!r} is {p.stat().st_size} bytes; at most {MAX_YAML_BYTES} are read")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {str(p)!r} is not UTF-8 text (byte {exc.start}); give a YAML file") from None
    data = parse_yaml(text, f"{what} {str(p)!r}", error)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {str(p)!r} must hold a mapping, got {type(data).__name__}")
    return data


def parse_yaml(text: str, where: str, error: type[ValueError] = ConfigError) -> Any:
    """The one YAML document in `text` (safe types only), refusing documents nested deeper than
    MAX_YAML_DEPTH or that aliases would expand beyond MAX_YAML_EXPANDED; `error` names `where`."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise error(f"{where} is not valid YAML: {show(str(exc))}") from None
        except RecursionError:
            raise error(f"{where} nests too deeply (more than {MAX_YAML_DEPTH} levels)") from None
        if node is None:
            return None
        _check_yaml_size(node, where, error)
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise error(f"{where} is not valid YAML: {show(str(exc))}") from None
        except (ValueError, OverflowError) as exc:  # e.g. an integer of more digits than Python converts
            raise error(f"{where}: a value cannot be read: {show(str(exc))}") from None
    finally:
        loader.dispose()


def _check_yaml_size(root: Any, where: str, error: type[ValueError]) -> None:
    """Raise `error` if the node graph under `root`, with every alias expanded, is deeper than
    MAX_YAML_DEPTH, larger than MAX_YAML_EXPANDED, or refers to itself. Shared nodes are sized once
    (memoised), so this is linear in the file, not in its expansion."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if depth > MAX_YAML_DEPTH:
            raise error(f"{where} nests too deeply (more than {MAX_YAML_DEPTH} levels)")
        if key in open_nodes:
            raise error(f"{where}: an alias refers to a node that contains it (a recursive structure)")
        open_nodes.add(key)
        if isinstance(node, yaml.ScalarNode):
            total = 1 + len(node.value) // 64
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child, depth + 1) for child in node.value)
        else:
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_YAML_EXPANDED:
            raise error(f"{where}: aliases expand it beyond {MAX_YAML_EXPANDED} nodes; "
                        "a config needs no such size (is it an alias bomb?)")
        sizes[key] = total
        return total

    size(root, 0)
