"""Upload an adapter to the Hugging Face Hub: the folder `PeftModel.save_pretrained` writes, nothing else.

``huggingface_hub`` is optional (not an lntune dependency). Without it, offline (``HF_HUB_OFFLINE=1``), or when
the Hub refuses or cannot be reached, `push_adapter_to_hub` raises with a one-line message and uploads nothing.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


class SavesAdapters(Protocol):
    """What `push_adapter_to_hub` needs of a model: `PeftModel.save_pretrained`."""

    def save_pretrained(self, save_directory: str, **kwargs) -> None: ...


class HubUploadError(OSError):
    """The adapter could not be uploaded (offline, no access, Hub unreachable); nothing was uploaded."""


def push_adapter_to_hub(
    model: SavesAdapters,
    repo_id: str,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    selected_adapters: list[str] | None = None,
) -> CommitInfo:
    """Save ``model``'s adapters to a temporary folder and upload that folder to the Hub repo ``repo_id``.

    Also ``PeftModel.push_to_hub`` (``model`` is then the `PeftModel` itself). The upload holds exactly the
    files `PeftModel.save_pretrained` writes (``adapter_config.json``, the adapter weights, ``README.md``,
    other adapters in subfolders); the base model is never uploaded.

    Args:
        model: The `PeftModel` whose adapters to upload.
        repo_id: ``"user/name"``; the model repo is created if needed (``private`` applies then).
        commit_message: Defaults to ``"Upload LN tuning adapter"``.
        commit_description: The commit's longer description.
        private: Visibility of a newly created repo.
        token: A Hub token; default: the one ``huggingface_hub`` finds (``hf auth login``, ``HF_TOKEN``).
        revision: The branch to push to (created if missing).
        create_pr: Open a pull request instead of committing to the branch.
        safe_serialization: safetensors (default) or ``adapter_model.bin``.
        selected_adapters: The adapters to upload (default: all).

    Returns:
        ``huggingface_hub``'s ``CommitInfo`` of the upload.

    Raises:
        ImportError: ``huggingface_hub`` is not installed.
        HubUploadError: offline mode, no access, or the Hub could not be reached.

    Example:
        >>> peft_model.push_to_hub("me/my-ln-adapter", private=True)
    """
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        raise ImportError(
            "push_to_hub needs the huggingface_hub package, which lntune does not install: "
            "pip install huggingface_hub (or save the adapter with save_pretrained and upload the folder yourself)."
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise HubUploadError(
            f"push_to_hub cannot upload to '{repo_id}': huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); "
            "unset it, or save the adapter with save_pretrained and upload the folder later."
        )
    with tempfile.TemporaryDirectory(prefix="lntune-push-") as folder:
        model.save_pretrained(folder, safe_serialization=safe_serialization, selected_adapters=selected_adapters)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload LN tuning adapter",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
        except Exception as exc:  # the Hub's many error types (HTTP, auth, connection) become one clear message
            summary = (str(exc).strip().splitlines() or [""])[0]
            raise HubUploadError(
                f"push_to_hub could not upload the adapter to '{repo_id}' ({type(exc).__name__}: {summary}); "
                "check the connection, the repo id and your token (hf auth login)."
            ) from exc
