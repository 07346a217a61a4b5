"""Atomic file writes: a crash never leaves a half-written file where a good one was."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public(path, mode: int = 0o666) -> None:
    """mkstemp/mkdtemp make private files (0600/0700); what we write is as readable as any file
    the user makes (the umask decides), so exported models can be shared."""
    os.chmod(path, mode & ~_umask())


def _write_error(path: Path, e: Exception):
    """A write the system refused (read-only folder, full disk, a folder in the way) is the user's
    to fix: one line naming the file and the reason."""
    from composer.errors import UserError
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in reason or "code: 28" in reason:
        reason = "no space left on the disk"
    return UserError(f"cannot write {path}: {reason}")


def _tempfile(path: Path) -> tuple[int, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None


def _atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = _tempfile(path)
    try:
        _public(tmp)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def save_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors writes by filename, so write to a temp name and rename."""
    path = Path(path)
    fd, tmp = _tempfile(path)
    os.close(fd)
    try:
        _public(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_config(folder: Path, fmt: str, error: type[Exception], what: str) -> dict:
    """FOLDER/config.json of an exported model, checked to be of format `fmt`; anything else
    raises `error` naming the folder and saying it is not `what` (e.g. "an exported stitch")."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{folder}: not {what} (config.json: {e})") from None
    if not isinstance(config, dict) or config.get("format") != fmt:
        found = config.get("format") if isinstance(config, dict) else None
        raise error(f"{folder}: config.json is not a {fmt} file, so this is not {what} (format={found!r})")
    return config


# --- output folders ----------------------------------------------------------------------------------

MARKER = ".zoo-composer.json"   # in every folder this program writes: what it holds


def folder_kind(folder: Path) -> dict | None:
    """What an output folder of ours holds ({"kind": ..., "of": ...}), or None for anything else."""
    try:
        found = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def check_output_folder(out: Path, kind: str, of: str, force: bool = False, protect=None) -> Path:
    """Refuse to write over anything but an earlier output of the same kind of the same thing.

    `out` may not exist yet, be an empty folder, or hold our earlier `kind` output of `of` (e.g. an
    earlier export of stitch 3 of the same run): those are replaced whole. Anything else (an
    anchor's folder, another export, a file, a trained run when `protect(found)` says so) is
    refused unless `force`. Raises UserError saying what is there and what to do."""
    from composer.errors import UserError
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder: choose a folder to write")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"cannot create the folder {out}: {blocker} is a file")
    if not out.exists() or force or not any(out.iterdir()):
        return out
    found = folder_kind(out)
    if found is None or found.get("kind") != kind or found.get("of") != of:
        what = "files of something else" if found is None else f"the {found.get('kind')} of {found.get('of')}"
        raise UserError(f"{out} already holds {what}: choose an empty or new folder (or pass --force to replace it)")
    reason = protect(found) if protect else None
    if reason:
        raise UserError(f"{out} {reason}: choose another folder (or pass --force to replace it)")
    return out


class staged_folder:
    """Write a whole folder or nothing: `with staged_folder(out, marker) as tmp:` fills a temporary
    folder beside `out`; on success it takes `out`'s place (the old content is removed only then),
    on any failure `out` is left as it was and the temporary folder is removed."""

    def __init__(self, out: Path, marker: dict):
        self.out, self.marker = Path(out).expanduser(), marker

    def __enter__(self) -> Path:
        from composer.errors import UserError
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            # the folder is filled under its own name (exports record it), inside a hidden box
            self.box = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp"))
            self.tmp = self.box / self.out.name
            self.tmp.mkdir()
            _public(self.tmp, 0o777)
        except OSError as e:
            raise UserError(f"cannot write {self.out}: {e.strerror or e}") from None
        return self.tmp

    def __exit__(self, kind, exc, tb) -> bool:
        import shutil
        if kind is not None:
            shutil.rmtree(self.box, ignore_errors=True)
            return False
        old = None
        try:
            write_json_atomic(self.tmp / MARKER, self.marker)
            if self.out.exists():
                old = self.box / ".old"
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
        except OSError as e:
            if old is not None and not self.out.exists():
                os.replace(old, self.out)   # put the previous version back
            shutil.rmtree(self.box, ignore_errors=True)
            from composer.errors import UserError
            raise UserError(f"cannot write {self.out}: {e.strerror or e}") from None
        shutil.rmtree(self.box, ignore_errors=True)
        return False
