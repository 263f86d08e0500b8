"""Every path a user types or uploads, resolved inside the root (`slimtune ui --root DIR`).

    "data/train.jsonl"      -> ROOT/data/train.jsonl
    "../x", "/etc/passwd"   -> refused (a `..` part; absolute and outside the root)
    "link" -> /elsewhere    -> refused (a symbolic link that leads out of the root)

The root is resolved once; a path is accepted when its fully resolved form (every
symbolic link followed) lies inside it. Scans for models, data, runs and adapters walk
the root a few levels deep, skip hidden folders and never follow a link out of it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.models import BUILTIN_MODELS

SKIP_DIRS = {"node_modules", "__pycache__", "site-packages", "checkpoints"}
DATA_SUFFIXES = (".jsonl", ".txt", ".csv", ".parquet")
NOT_DATA = {"metrics.jsonl"}


def demo_data() -> dict[str, Path]:
    """The bundled demo data sets, offered by name (they are part of slimtune, not user paths)."""
    folder = Path(str(resources.files("slimtune") / "demo_data"))
    return {f"demo: {name}": folder / name for name in ("train.jsonl", "heldout.jsonl")}


class Root:
    """The one folder the app reads and writes in."""

    def __init__(self, root: str | os.PathLike) -> None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise SlimtuneError(f"--root {root} is not a directory")
        self.path = path.resolve()

    def resolve(self, text: str | None, what: str = "path") -> Path:
        """The absolute path of `text` inside the root; anything leading out is refused."""
        text = (text or "").strip()
        if not text:
            raise SlimtuneError(f"{what}: give a path inside {self.path}")
        if "\x00" in text:
            raise SlimtuneError(f"{what} {text!r}: not a valid path")
        given = Path(text)
        if ".." in given.parts:
            raise SlimtuneError(f"{what} {text!r} is refused: '..' would lead outside {self.path}")
        full = (given if given.is_absolute() else self.path / given).resolve()
        if not full.is_relative_to(self.path):
            why = "a symbolic link leads" if not given.is_absolute() else "it is"
            raise SlimtuneError(f"{what} {text!r} is refused: {why} outside {self.path}")
        return full

    def relative(self, path: Path) -> str:
        """`path` as the user sees it: relative to the root."""
        try:
            return str(path.relative_to(self.path)) or "."
        except ValueError:
            return str(path)

    def model(self, text: str) -> str:
        """A model argument: a built-in name, or a directory or .gguf file inside the root."""
        text = (text or "").strip()
        if text in BUILTIN_MODELS:
            return text
        return str(self.resolve(text, "model"))

    def data(self, text: str, what: str = "data", copy: bool = True) -> Path:
        """A data file inside the root; a bundled demo set by name is copied to ROOT/data/demo/
        first (unless only read: copy=False), so that every command names a file under the
        root and runs from it."""
        demos = demo_data()
        if (text or "").strip() in demos:
            source = demos[text.strip()]
            return self.copy_in(source, Path("data") / "demo") if copy else source
        path = self.resolve(text, what)
        if not path.is_file():
            raise SlimtuneError(f"{what} {text!r} is not a file inside {self.path}")
        if path.suffix not in DATA_SUFFIXES:
            raise SlimtuneError(f"{what} {text!r}: give a {', '.join(DATA_SUFFIXES)} file")
        return path

    def copy_in(self, source: Path, folder: Path) -> Path:
        """ROOT/folder/source.name, written (atomically) unless it already holds the same bytes."""
        target = self.path / folder / source.name
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return target

    def walk(self, depth: int = 4, budget: int = 20000):
        """(folder, file names) under the root, a few levels deep, hidden folders skipped."""
        seen = 0
        for folder, dirs, files in os.walk(self.path, followlinks=False):
            here = Path(folder)
            level = len(here.relative_to(self.path).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
            if level >= depth:
                dirs[:] = []
            seen += len(files) + len(dirs)
            yield here, sorted(files)
            if seen > budget:
                return

    def scan(self) -> dict[str, list[str]]:
        """What the root holds: models, data files, runs and adapters (paths relative to it)."""
        found: dict[str, list[str]] = {"models": [], "data": [], "runs": [], "adapters": []}
        for folder, files in self.walk():
            rel = self.relative(folder)
            names = set(files)
            if "config.json" in names and any(f.endswith(".safetensors") for f in files):
                found["models"].append(rel)
            if "adapter_config.json" in names:
                found["adapters"].append(rel)
            if "config.yaml" in names and names & {"metrics.jsonl", "summary.json"}:
                found["runs"].append(rel)
            for name in files:
                path = folder / name
                if path.is_symlink() and not path.resolve().is_relative_to(self.path):
                    continue
                if name.endswith(".gguf") and "lora" not in name and "adapter" not in name:
                    found["models"].append(self.relative(path))
                elif name.endswith(DATA_SUFFIXES) and name not in NOT_DATA:
                    found["data"].append(self.relative(path))
        for key in ("runs", "adapters"):  # newest first: the run just trained comes first
            found[key].sort(key=lambda rel: -(self.path / rel).stat().st_mtime)
        return found

    def model_choices(self, scanned: dict[str, list[str]]) -> list[str]:
        return [*BUILTIN_MODELS, *scanned["models"]]

    def data_choices(self, scanned: dict[str, list[str]]) -> list[str]:
        return [*scanned["data"], *demo_data()]

    def adapter_choices(self, scanned: dict[str, list[str]]) -> list[str]:
        return scanned["adapters"]
