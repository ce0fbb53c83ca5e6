"""What a target produces: a template (one file) or a bundle (a set swapped as a whole).

One small interface, ``Output``, and one implementation per output type, looked up by config
type in ``OUTPUTS`` (``output_for``); the renderer, the dry run and the start-up cleanup ask the
output, never the config's type. Adding an output type is adding a class here and a row in the
table.

An output is a frozen view of its config: pure apart from ``texts`` (reads a ``source`` file),
``fingerprint``/``clean`` (stat and clean the disk) and ``write``/``remove``, which block and run
in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from agentd import fsafe
from agentd.config import BundleConfig, Config, TemplateConfig
from agentd.errors import RenderError, UnsafePath
from agentd.render import files
from agentd.render.files import DATA, FileWrite


@dataclass(frozen=True)
class Written:
    """A write that finished on its own (not batched): whether anything changed, and the old
    bundle version directory to remove once ``grace`` seconds have passed (``""``: none)."""

    changed: bool
    old_version: str = ""
    grace: float = 0.0


class Output(Protocol):
    """One rendered output of a ``[[template]]`` or ``[[bundle]]``."""

    config: TemplateConfig | BundleConfig
    # an event on this path's children is about this output (a bundle's links and ..data)
    links: ClassVar[bool]

    @property
    def key(self) -> str:
        """The target's name: its destination or its directory."""

    @property
    def directory(self) -> Path:
        """The directory written to (watched, cleaned at start)."""

    @property
    def source(self) -> Path | None:
        """A template file read at every render, if any."""

    def texts(self) -> dict[str, str]:
        """File name -> template text (may read ``source``: blocking)."""

    def modes(self) -> dict[str, int]:
        """File name -> mode."""

    def paths(self) -> dict[str, Path]:
        """File name -> where a reader finds it."""

    def covers(self, path: Path) -> bool:
        """Whether a change at ``path`` touches this output."""

    def fingerprint(self) -> tuple[int, ...] | None:
        """A cheap fingerprint of what is on disk now (drift detection)."""

    def write(self, outputs: Mapping[str, bytes], dirs: dict[Path, int]) -> FileWrite | Written:
        """In a thread: a ``FileWrite`` to commit with the batch (``write_files``), or the
        finished result. ``dirs`` caches opened and checked directories; the caller closes them.
        Raises ``RenderError``."""

    def remove(self) -> None:
        """``on_revoke = "remove"``: delete what readers see. Errors are logged, never raised."""

    @staticmethod
    def clean(dir_fd: int) -> list[str]:
        """At start: remove what interrupted writes of this type leave in a directory."""


@dataclass(frozen=True)
class TemplateOutput:
    """``[[template]]``: one file at ``destination``, written with the batch."""

    config: TemplateConfig
    links: ClassVar[bool] = False

    @property
    def key(self) -> str:
        return str(self.config.destination)

    @property
    def directory(self) -> Path:
        return self.config.destination.parent

    @property
    def source(self) -> Path | None:
        return self.config.source

    def texts(self) -> dict[str, str]:
        c = self.config
        if c.source is not None:
            # Through fsafe at every read: a source (or a directory above it) that another user
            # could have swapped since the config was loaded is refused, not rendered.
            try:
                return {c.destination.name: fsafe.read_text(c.source)}
            except UnsafePath as exc:
                raise RenderError(f"{c.destination}: cannot read the template {exc}") from exc
        return {c.destination.name: c.contents or ""}

    def modes(self) -> dict[str, int]:
        return {self.config.destination.name: self.config.mode}

    def paths(self) -> dict[str, Path]:
        return {self.config.destination.name: self.config.destination}

    def covers(self, path: Path) -> bool:
        return path == self.config.destination

    def fingerprint(self) -> tuple[int, ...] | None:
        return files.file_fingerprint(self.config.destination)

    def write(self, outputs: Mapping[str, bytes], dirs: dict[Path, int]) -> FileWrite | Written:
        c = self.config
        where = str(c.destination)
        fd = dirs.get(c.destination.parent)
        if fd is None:
            fd = files.open_dir(c.destination.parent)
            try:
                files.check_dir(fd, where)
            except RenderError:
                os.close(fd)
                raise
            dirs[c.destination.parent] = fd
        return FileWrite(fd, c.destination.name, outputs[c.destination.name], mode=c.mode,
                         uid=c.owner, gid=c.group, where=where, backup=c.backup)

    def remove(self) -> None:
        files.remove_names(self.directory, [self.config.destination.name])

    clean = staticmethod(files.clean_temps)


@dataclass(frozen=True)
class BundleOutput:
    """``[[bundle]]``: files in ``directory`` swapped together (AtomicWriter layout)."""

    config: BundleConfig
    links: ClassVar[bool] = True

    @property
    def key(self) -> str:
        return str(self.config.directory)

    @property
    def directory(self) -> Path:
        return self.config.directory

    @property
    def source(self) -> Path | None:
        return None

    def texts(self) -> dict[str, str]:
        return dict(self.config.files)

    def modes(self) -> dict[str, int]:
        return _modes(self.config)

    def paths(self) -> dict[str, Path]:
        return {name: self.config.directory / name for name in self.config.files}

    def covers(self, path: Path) -> bool:
        return self.config.directory in (path, path.parent)

    def fingerprint(self) -> tuple[int, ...] | None:
        return files.bundle_fingerprint(self.config.directory, self.config.files)

    def write(self, outputs: Mapping[str, bytes], dirs: dict[Path, int]) -> FileWrite | Written:
        c = self.config
        where = str(c.directory)
        try:
            os.mkdir(c.directory, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise files.os_error(where, "cannot create the bundle directory", exc) from exc
        fd = files.open_dir(c.directory)
        try:
            files.check_dir(fd, where)
            old = files.write_bundle(fd, outputs, modes=_modes(c), uid=c.owner, gid=c.group,
                                     where=where)
        finally:
            os.close(fd)
        if old is None:
            return Written(changed=False)
        return Written(changed=True, old_version=old, grace=c.grace)

    def remove(self) -> None:
        files.remove_names(self.directory, [*self.config.files, DATA])

    clean = staticmethod(files.clean_bundle)


def _modes(c: BundleConfig) -> dict[str, int]:
    return {name: c.modes.get(name, c.mode) for name in c.files}


OUTPUTS: dict[type, Callable[[TemplateConfig | BundleConfig], Output]] = {
    TemplateConfig: TemplateOutput,     # type: ignore[dict-item]
    BundleConfig: BundleOutput,         # type: ignore[dict-item]
}


def output_for(config: TemplateConfig | BundleConfig) -> Output:
    """The output of one ``[[template]]`` or ``[[bundle]]`` (looked up in ``OUTPUTS``)."""
    return OUTPUTS[type(config)](config)


def outputs_of(config: Config) -> list[Output]:
    """Every output of ``config``: templates first, then bundles."""
    configs: list[TemplateConfig | BundleConfig] = [*config.templates, *config.bundles]
    return [output_for(c) for c in configs]
