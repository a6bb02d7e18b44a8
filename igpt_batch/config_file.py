"""A config file read safely: YAML through safe_load, refused before any object is built when it is too large,
expands too far through aliases (an alias bomb), holds itself or nests too deeply."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from igpt_batch.errors import ConfigError

YAML_MAX_BYTES, YAML_MAX_NODES = 1 << 20, 100_000  # a config file's size, and its values with aliases expanded


def read_yaml(p: Path) -> Any:
    """A config file's YAML (safe_load: no python tags), or a ConfigError naming the file."""
    import yaml

    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder: pass a YAML file (see configs/)")
    try:
        if p.stat().st_size > YAML_MAX_BYTES:
            raise ConfigError(f"config file {p} is over {YAML_MAX_BYTES} bytes: not a config file")
        loader = yaml.SafeLoader(p.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None and _expanded(node, {}, set()) > YAML_MAX_NODES:  # before any object is built
                raise ConfigError(f"config file {p} expands to over {YAML_MAX_NODES} values through its aliases "
                                  "(an alias bomb?): write the values out")
            return (loader.construct_document(node) if node is not None else None) or {}
        finally:
            loader.dispose()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or type(e).__name__}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply: not a config file") from None


def _expanded(node, sizes: dict, open_: set) -> int:
    """How many values the YAML node stands for once every alias is copied out; an alias is a shared node, so each
    is counted once (sizes) however often it is used, and a node inside itself counts as too many."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        return YAML_MAX_NODES + 1
    open_.add(id(node))
    items = node.value if isinstance(node.value, list) else []
    children = [c for item in items for c in (item if isinstance(item, tuple) else (item,))]
    total = 1
    for child in children:
        total += _expanded(child, sizes, open_)
        if total > YAML_MAX_NODES:
            break
    open_.discard(id(node))
    sizes[id(node)] = total
    return total
