"""Every error the SDK raises on purpose.

Each class also derives from the builtin a caller would naturally catch, so
``except FileNotFoundError`` or ``except ValueError`` keeps working. Messages say
what was received, what was expected, and (where it helps) what to do next.
"""

from __future__ import annotations


class LlamascopeError(Exception):
    """Base class of every error raised on purpose by llamascope_sdk."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UnknownSaeError(LlamascopeError, KeyError):
    """A name that does not denote any of the 256 Llama Scope checkpoints."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class SaeNotFoundError(LlamascopeError, FileNotFoundError):
    """A repository, folder, file or revision that does not exist (locally or on the Hub)."""


class DownloadError(LlamascopeError, OSError):
    """A download that failed (network cut, offline with a cold cache, gated repo, ...)."""


class DataUnavailableError(LlamascopeError, OSError):
    """Text data that cannot be read: a missing or unsupported file, or an unreachable dataset."""


class DataFileNotFoundError(DataUnavailableError, FileNotFoundError):
    """A local corpus file that does not exist."""


class DataFormatError(DataUnavailableError, ValueError):
    """A local corpus file of a type that cannot be read (not .txt/.jsonl/.parquet)."""


class DatasetStreamError(DataUnavailableError, DownloadError, ConnectionError):
    """A Hugging Face dataset that cannot be opened or streamed (offline, wrong name or split)."""


class TextFieldError(LlamascopeError, KeyError):
    """A dataset row without the requested text field."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorruptCheckpointError(LlamascopeError, ValueError):
    """A checkpoint file that cannot be read, has the wrong shapes or holds non-finite values."""


class HyperparamsError(LlamascopeError, ValueError):
    """A hyperparams.json that is missing a field, has a wrong type, or an unsupported value."""


class IncompatibleModelError(LlamascopeError, ValueError):
    """An SAE used with a model it does not fit (hidden size, layer count, missing module)."""


class HookpointNotFoundError(LlamascopeError, KeyError):
    """A hook site the model does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FolderNotOwnedError(LlamascopeError, FileExistsError):
    """An output folder that holds files the SDK did not write (or another kind of output):
    it is refused, never emptied, because a save replaces its folder whole."""

    hint = "give a new or empty folder, or move the other files away"


class FeatureIndexError(LlamascopeError, IndexError):
    """A feature index outside [0, d_sae)."""


def closest(candidates: list[str], got: str, n: int = 5) -> list[str]:
    """Up to ``n`` entries of ``candidates`` closest to ``got`` (case-insensitive)."""
    import difflib

    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(got.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


class DeviceError(LlamascopeError, ValueError):
    """A device that does not exist on this machine, or that the SDK cannot run on."""


class InputError(LlamascopeError, ValueError):
    """Text or numbers a caller passed that cannot be used as given (empty, too long, NaN...)."""


class OutputPathError(LlamascopeError, OSError):
    """An output path the SDK will not write: a file where a folder goes, a folder (or file) the
    SDK did not write, or a place without write permission. Checked before any work starts."""


class StoreMismatchError(LlamascopeError, ValueError):
    """A feature store mined with a different SAE than the one it is used with."""


# --------------------------------------------------------------------------- Hub downloads
class ChecksumMismatchError(CorruptCheckpointError):
    """A downloaded file whose content does not hash to what the Hub announced for it (sha256
    for LFS files, the git blob sha1 for regular files). The file is removed from the cache."""


class UnverifiableDownloadError(CorruptCheckpointError):
    """A downloaded file whose announced ETag is neither a sha256 nor a git blob sha1, so its
    content cannot be checked (a mirror that rewrites ETags). Opt out: LLAMASCOPE_VERIFY=0."""


class HubUnreachableError(DownloadError, ConnectionError):
    """The Hub (HF_ENDPOINT) could not be reached and no usable copy is cached."""


class HubAccessError(DownloadError, PermissionError):
    """The Hub refused access: a gated or private repository without a token that may read it."""


class ModelNotFoundError(DownloadError, FileNotFoundError):
    """A language model id that is neither a local folder nor a repository (or revision) on the Hub."""


class DtypeOverflowError(LlamascopeError, ValueError):
    """Weights (or a threshold) that are finite in the file but overflow the dtype chosen at load,
    e.g. a folded encoder value above 65504 loaded as float16."""

    hint = "load in float32 (or bfloat16, whose range is that of float32)"


# --------------------------------------------------------------------------- the SAE pool
class SaeBudgetError(LlamascopeError, MemoryError):
    """An SAE larger than the whole SAE memory budget of a :class:`~llamascope_sdk.steering.pool.SaePool`."""


class PoolBusyError(SaeBudgetError):
    """The SAE memory budget is taken by SAEs in use: the load may succeed later."""
