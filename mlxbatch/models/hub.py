"""Hugging Face hub repos: fetching one into the hub's own cache, and saying why a fetch failed.

Owns: what is fetched of a repo (mlx-lm's file patterns) and the map from huggingface_hub's
exceptions to a `ModelError` that names the repo and the cause (offline and not cached, not
found, gated, needs a token, incomplete cache). Does not own: deciding that a `--model` is a repo
id (models/__init__.py `local_path`), loading the folder.
"""

from __future__ import annotations

from pathlib import Path

from mlxbatch.errors import ModelError

# What mlx-lm's loader fetches of a hub repo (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS).
HF_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
               "*.jsonl", "*.jinja"]
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def download(repo: str) -> Path:
    """The repo's snapshot folder: from the cache when it is there (HF_HUB_OFFLINE=1: only from it)."""
    # huggingface_hub directly: mlx_lm.utils would import transformers
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HF_PATTERNS))
    except Exception as exc:
        raise fetch_error(repo, exc) from exc


def fetch_error(repo: str, exc: Exception) -> ModelError:
    """A ModelError that names the repo and says why it could not be fetched."""
    return ModelError(f"could not fetch {repo!r} from the Hugging Face hub: {_why(exc)}")


def _why(exc: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Subclasses first: a gated repo is a RepositoryNotFoundError, an incomplete cache a LocalEntryNotFoundError.
    if isinstance(exc, GatedRepoError):
        return f"the repo is gated: accept its terms on huggingface.co, then {LOGIN_HINT}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"no such repo (or it is private: {LOGIN_HINT}); a local folder of that name does not exist either"
    if isinstance(exc, RevisionNotFoundError):
        return "the repo has no such revision"
    if type(exc).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x only
        return f"its cached copy is incomplete and the hub could not be reached to finish it ({exc})"
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.HF_HUB_OFFLINE or isinstance(exc.__cause__, OfflineModeIsEnabled):
            return "offline (HF_HUB_OFFLINE=1) and not in the Hugging Face cache; fetch it once online"
        return "the hub could not be reached and it is not in the Hugging Face cache; check the network"
    if isinstance(exc, HFValidationError):
        return f"not a valid repo id ({exc})"
    if isinstance(exc, HfHubHTTPError) and getattr(exc.response, "status_code", None) == 401:
        return f"unauthorized: {LOGIN_HINT}"
    return f"{type(exc).__name__}: {exc}"
